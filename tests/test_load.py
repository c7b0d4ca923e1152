"""Reading students: every supported format gives the same tensors; bad files are refused cleanly."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import helpers
from mbconvert import errors
from mbconvert.load import load_student


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
    loaded = load_student(formats[fmt])
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
    assert load_student(formats["hf folder"]).config.num_attention_heads == 8  # config.json
    assert load_student(formats["state dict .pt"]).config.num_attention_heads == 8  # default 512 / 64
    assert load_student(formats["state dict .pt"], heads=4).config.num_attention_heads == 4


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
    loaded = load_student(tmp_path / "roberta.pt")
    assert loaded.family == "roberta"
    for key, tensor in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key


def test_bare_encoder_loads_without_head(student, tokenizer, tmp_path):
    sd = {k: v for k, v in student.state_dict().items() if not k.startswith("classifier")}
    torch.save(sd, tmp_path / "encoder.pt")
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_student(tmp_path / "encoder.pt")
    assert not loaded.has_head


def test_code_executing_pickle_is_refused_without_running(tmp_path, tokenizer):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Payload()}, f)
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(errors.UnsafeFileError):
        load_student(tmp_path / "evil.pt")
    assert not marker.exists()
