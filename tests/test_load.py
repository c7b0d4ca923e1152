"""Reading students: every supported format gives the same tensors; bad files are refused cleanly."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import helpers
from mbconvert import errors
from mbconvert.safeload import safe_torch_load
from mbconvert.load import infer_config, load_classifier, load_source, source_from_model


@pytest.fixture(scope="module")
def student():
    """A random-init BERT of the users' shape: 4 layers, hidden 512, 8 heads."""
    return helpers.random_student(hidden=512, layers=4, heads=8)


@pytest.fixture(scope="module")
def formats(student, tokenizer, tmp_path_factory):
    """The same student saved in every supported format (each folder also holds the tokenizer)."""
    root = tmp_path_factory.mktemp("formats")
    sd = student.state_dict()
    out = {}

    def folder(name):
        d = root / name
        d.mkdir()
        tokenizer.save_pretrained(str(d))
        return d

    hf = folder("hf")
    student.save_pretrained(str(hf))
    out["hf folder"] = hf
    torch.save(sd, folder("pt") / "student.pt")
    out["state dict .pt"] = root / "pt" / "student.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, folder("module") / "student.bin")
    out["DataParallel prefix .bin"] = root / "module" / "student.bin"
    torch.save({k.removeprefix("bert."): v for k, v in sd.items()}, folder("bare") / "student.pt")
    out["no bert. prefix"] = root / "bare" / "student.pt"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder("st") / "student.safetensors"))
    out["safetensors"] = root / "st" / "student.safetensors"
    torch.save(helpers.to_uer(sd), folder("uer") / "student.bin")
    out["UER-py names"] = root / "uer" / "student.bin"
    return out


@pytest.mark.parametrize("fmt", ["hf folder", "state dict .pt", "DataParallel prefix .bin", "no bert. prefix",
                                 "safetensors", "UER-py names"])
def test_every_format_loads_to_the_same_tensors(fmt, formats, student):
    loaded = load_source(formats[fmt])
    assert loaded.config.num_hidden_layers == 4
    assert loaded.config.hidden_size == 512
    assert loaded.config.intermediate_size == 2048
    assert loaded.config.num_labels == 4
    assert loaded.has_head
    want = student.state_dict()
    got = loaded.model.state_dict()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_heads_come_from_config_or_flag_or_default(formats):
    assert load_source(formats["hf folder"]).config.num_attention_heads == 8  # config.json
    assert load_source(formats["state dict .pt"]).config.num_attention_heads == 8  # default 512 / 64
    assert load_source(formats["state dict .pt"], heads=4).config.num_attention_heads == 4


def test_roberta_head_and_positions_are_mapped(student, tokenizer, tmp_path):
    """RobertaForSequenceClassification names: dense+out_proj head, positions offset by 2."""
    sd = student.state_dict()
    rob = {}
    for k, v in sd.items():
        if k.startswith("bert.pooler"):
            rob["classifier.dense." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("classifier."):
            rob["classifier.out_proj." + k.rsplit(".", 1)[1]] = v
        elif k == "bert.embeddings.position_embeddings.weight":
            rob["roberta.embeddings.position_embeddings.weight"] = torch.cat([torch.zeros(2, v.shape[1]), v])
        else:
            rob["roberta." + k.removeprefix("bert.")] = v
    torch.save(rob, tmp_path / "roberta.pt")
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_source(tmp_path / "roberta.pt")
    assert loaded.family == "roberta"
    for key, tensor in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key


def test_bare_encoder_loads_without_head(student, tokenizer, tmp_path):
    sd = {k: v for k, v in student.state_dict().items() if not k.startswith("classifier")}
    torch.save(sd, tmp_path / "encoder.pt")
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_source(tmp_path / "encoder.pt")
    assert not loaded.has_head


def test_code_executing_pickle_is_refused_without_running(tmp_path, tokenizer):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Payload()}, f)
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(errors.UnsafeFileError, match="refusing to unpickle code"):
        load_source(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------ hostile or odd files
@pytest.fixture(scope="module")
def small():
    """A tiny BERT (hidden 64, 2 layers, 2 heads, 4 classes) for the file-handling tests."""
    return helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)


def _same_tensors(loaded, model) -> bool:
    got = loaded.model.state_dict()
    return all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_file_type_comes_from_the_bytes_not_the_name(small, tokenizer, tmp_path):
    sd = small.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "really_safetensors.pt"))
    torch.save(sd, tmp_path / "really_torch.safetensors")
    tokenizer.save_pretrained(str(tmp_path))
    for name in ("really_safetensors.pt", "really_torch.safetensors"):
        assert _same_tensors(load_source(tmp_path / name), small), name
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(errors.CorruptFileError, match="not a PyTorch or safetensors file"):
        load_source(tmp_path / "noise.pt")
    whole = (tmp_path / "really_torch.safetensors").read_bytes()
    (tmp_path / "half.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(errors.CorruptFileError) as e:
        load_source(tmp_path / "half.pt")
    assert "unpickle code" not in str(e.value) and "\n" not in str(e.value)


def _bomb_state_dict(small, rows: int) -> dict:
    """The small student with a word table that is one float expanded (stride 0) to `rows` rows."""
    sd = dict(small.state_dict())
    sd["bert.embeddings.word_embeddings.weight"] = torch.zeros(1).expand(rows, 64)
    return sd


def test_expanded_view_bomb_is_refused_before_anything_is_materialised(small, tokenizer, tmp_path):
    """A tiny file declaring a 205 MB stride-0 word table: refused from the declared sizes, and the loading
    process's peak memory does not grow by anything like the table (measured in a fresh process)."""
    path = tmp_path / "bomb.pt"
    torch.save(_bomb_state_dict(small, 800_000), path)
    tokenizer.save_pretrained(str(tmp_path))
    assert path.stat().st_size < 2**20  # 800_000 × 64 × 4 bytes = 205 MB when materialised
    probe = textwrap.dedent("""
        import resource, sys
        from mbconvert import errors
        from mbconvert.load import load_source
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_source(sys.argv[1])
            print("loaded")
        except errors.CorruptFileError as e:
            print("refused:", e)
        print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300,
                         env=env, cwd=Path(__file__).parent.parent)
    lines = run.stdout.splitlines()
    assert lines and lines[0].startswith("refused:") and "expanded or overlapping" in lines[0], run.stdout + run.stderr
    assert int(lines[-1].split()[1]) < 60


@pytest.mark.parametrize("case", ["expanded", "expanded, legacy format", "overlapping", "shared storage"])
def test_views_declaring_more_than_the_file_holds_are_refused(case, tmp_path):
    path = tmp_path / "weights.pt"
    if case.startswith("expanded"):
        obj = {"w": torch.zeros(1).expand(1000, 1000)}
    elif case == "overlapping":
        obj = {"w": torch.arange(2000.0).as_strided((1000, 1000), (1, 1))}  # fits its storage, rows overlap
    else:
        block = torch.zeros(2**18)  # 1 MiB, viewed 40 times
        obj = {f"w{i}": block[:] for i in range(40)}
    torch.save(obj, path, _use_new_zipfile_serialization="legacy" not in case)
    with pytest.raises(errors.CorruptFileError, match="expanded or overlapping|far more than the file") as e:
        safe_torch_load(path)
    assert "\n" not in str(e.value)


def test_tables_larger_than_any_tokenizer_are_refused_from_shapes_alone(small):
    """Shapes are checked before anything is built: meta tensors (no memory) are enough to be refused."""
    canonical = dict(small.state_dict())
    for key, rows in (("bert.embeddings.word_embeddings.weight", 2**24),
                      ("bert.embeddings.position_embeddings.weight", 2**22)):
        sd = {**canonical, key: torch.empty(rows, 64, device="meta")}
        with pytest.raises(errors.ShapeMismatchError, match=str(rows)):
            infer_config(sd)


# ------------------------------------------------------------------ config.json and labels.json
def _edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name, obj, **config_changes):
    def edit(folder):
        _edit_config(**config_changes)(folder)
        (folder / name).write_text(json.dumps(obj))
    return edit


BROKEN_FOLDERS = {
    "config.json is a list": (_write("config.json", [1, 2, 3]), errors.CorruptFileError, "JSON object"),
    "heads as a string": (_edit_config(num_attention_heads="2"), errors.CorruptFileError, "num_attention_heads"),
    "id2label keys not integers": (_edit_config(id2label={"a": "x", "b": "y", "c": "z", "d": "w"}),
                                   errors.CorruptFileError, "id2label"),
    "labels.json not strings": (_write("labels.json", {"0": "a"}, id2label=None, label2id=None),
                                errors.CorruptFileError, "labels.json"),
    "labels.json too short": (_write("labels.json", ["a", "b"], id2label=None, label2id=None),
                              errors.ShapeMismatchError, "2 classes .* 4"),
    "id2label too long": (_edit_config(id2label={str(i): f"c{i}" for i in range(5)}, label2id=None),
                          errors.ShapeMismatchError, "5 classes .* 4"),
    "hidden_size contradicts": (_edit_config(hidden_size=128), errors.ShapeMismatchError, "hidden_size 128 .* 64"),
    "num_hidden_layers contradicts": (_edit_config(num_hidden_layers=3), errors.ShapeMismatchError,
                                      "num_hidden_layers 3 .* 2"),
    "truncated safetensors": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
                              errors.CorruptFileError, "safetensors"),
}


@pytest.fixture
def small_folder(small, tokenizer, tmp_path):
    small.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_bad_config_and_labels_are_one_line_typed_errors(case, small_folder):
    breakage, error, pattern = BROKEN_FOLDERS[case]
    breakage(small_folder)
    with pytest.raises(error, match=pattern) as e:
        load_source(small_folder)
    assert "\n" not in str(e.value)


def test_labels_json_names_the_classes_when_config_does_not(small_folder):
    _write("labels.json", ["w", "x", "y", "z"], id2label=None, label2id=None)(small_folder)
    assert load_source(small_folder).config.id2label == {0: "w", 1: "x", 2: "y", 3: "z"}


# ------------------------------------------------------------------ converted MobileBERT folders
@pytest.fixture(scope="module")
def converted(small, tokenizer, tmp_path_factory):
    """A MobileBERT converted from the small student and saved the way mbconvert saves it."""
    from mbconvert.config import ConvertConfig
    from mbconvert.mapping import MobileBERTAdapter

    mobile, _ = MobileBERTAdapter(ConvertConfig(bottleneck=32, embedding_size=32, ffn=1)).convert(small)
    folder = tmp_path_factory.mktemp("converted")
    mobile.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return mobile, folder


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_converted_folder_loads_with_its_own_outputs(converted):
    mobile, folder = converted
    model, tok = load_classifier(folder)
    ids = torch.tensor([[101, 200, 300, 102]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, mobile(input_ids=ids).logits)
    assert len(tok) == mobile.config.vocab_size


def test_truncated_converted_weights_are_a_corrupt_file(converted, tmp_path):
    folder = _copy(converted[1], tmp_path / "c")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(errors.CorruptFileError, match="safetensors"):
        load_classifier(folder)


def test_code_in_a_converted_folder_is_refused_without_running(converted, tmp_path):
    folder = _copy(converted[1], tmp_path / "c")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"classifier.weight": Payload()}))
    with pytest.raises(errors.UnsafeFileError, match="refusing to unpickle code"):
        load_classifier(folder)
    assert not marker.exists()


def test_converted_config_contradicting_the_weights_is_a_shape_error(converted, tmp_path):
    folder = _copy(converted[1], tmp_path / "c")
    _edit_config(hidden_size=128)(folder)
    with pytest.raises(errors.ShapeMismatchError, match="128"):
        load_classifier(folder)


# ------------------------------------------------------------------ in-memory models
def test_in_memory_roberta_classifier_gives_the_same_logits(tokenizer):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=66, type_vocab_size=1, num_labels=3,
                        pad_token_id=1)
    roberta = RobertaForSequenceClassification(cfg).eval()
    src = source_from_model(roberta, tokenizer)
    assert (src.family, src.has_head) == ("roberta", True) and src.tokenizer is tokenizer
    assert src.config.max_position_embeddings == 64 and src.config.num_labels == 3
    ids = torch.tensor([[0, 50, 60, 70, 80, 2], [0, 90, 100, 2, 1, 1]])  # the second row is right-padded
    mask = (ids != 1).long()
    with torch.no_grad():
        want = roberta(input_ids=ids, attention_mask=mask).logits
        got = src.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    ours, theirs = src.model.bert.embeddings.word_embeddings.weight, roberta.roberta.embeddings.word_embeddings.weight
    assert ours.data_ptr() != theirs.data_ptr()  # a copy: training the source later cannot change it


def test_in_memory_encoder_without_head_goes_through_load_source(small, tokenizer):
    encoder = small.bert  # a BertModel: bare names, no classifier
    src = load_source(encoder, tokenizer=tokenizer)
    assert not src.has_head
    got = src.model.bert.state_dict()
    assert all(torch.equal(got[k], v) for k, v in encoder.state_dict().items())
