"""Source families beyond BERT (issue 21): DistilBERT, ELECTRA and ALBERT load to the same function in every file
format, convert better than a random init, and recover like BERT does.

`FamilyTester` owns each family's tiny config (the transformers ModelTester pattern); the models are built here."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AlbertConfig, AlbertForSequenceClassification, AutoModelForSequenceClassification,
                          DistilBertConfig, DistilBertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification)

import helpers
from mbconvert.cli import main
from mbconvert.config import ConvertConfig
from mbconvert.data import encode, read_examples
from mbconvert.errors import UnknownArchitectureError
from mbconvert.load import load_source
from mbconvert.mapping import MobileBERTAdapter, evaluate_mapping

VOCAB = len(helpers.SPECIAL) + len(helpers.CHARS)
LABELS = dict(num_labels=len(helpers.LABELS), id2label=dict(enumerate(helpers.LABELS)),
              label2id={n: i for i, n in enumerate(helpers.LABELS)})


@dataclass
class FamilyTester:
    """One family: how to build a tiny classifier of it, and what its canonical form must show."""

    family: str
    depth: int = 2  # ALBERT: how often its shared layer is applied
    hidden: int = 128
    heads: int = 4

    def config(self):
        common = dict(vocab_size=VOCAB, max_position_embeddings=64, **LABELS)
        if self.family == "distilbert":
            return DistilBertConfig(dim=self.hidden, n_layers=self.depth, n_heads=self.heads,
                                    hidden_dim=4 * self.hidden, **common)
        sizes = dict(embedding_size=self.hidden // 2, hidden_size=self.hidden, num_hidden_layers=self.depth,
                     num_attention_heads=self.heads, intermediate_size=4 * self.hidden, **common)
        return ElectraConfig(**sizes) if self.family == "electra" else AlbertConfig(**sizes)

    def model(self, seed: int = 0):
        torch.manual_seed(seed)
        cls = {"distilbert": DistilBertForSequenceClassification, "electra": ElectraForSequenceClassification,
               "albert": AlbertForSequenceClassification}[self.family]
        cfg = self.config()
        cfg._attn_implementation = "eager"
        return cls(cfg).eval()

    def load_options(self) -> dict:
        """What a bare state dict needs said (BERT needs --heads the same way)."""
        return {"heads": self.heads, "layers": self.depth if self.family == "albert" else None}


TESTERS = [FamilyTester("distilbert"), FamilyTester("electra"), FamilyTester("albert", depth=3)]
IDS = [t.family for t in TESTERS]


def logits(model, enc):
    """A model's logits on encoded texts (DistilBERT takes no token types)."""
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def save_every_format(model, tokenizer, root) -> dict:
    """The model as an HF folder, a bare state dict (.pt) and a safetensors file, each with the tokenizer beside."""
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root / "folder"))
    tokenizer.save_pretrained(str(root / "folder"))
    (root / "files").mkdir()
    tokenizer.save_pretrained(str(root / "files"))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, root / "files" / "student.pt")
    save_file(sd, str(root / "files" / "student.safetensors"))
    return {"folder": root / "folder", "pt": root / "files" / "student.pt",
            "safetensors": root / "files" / "student.safetensors"}


@pytest.fixture(scope="module")
def texts(tokenizer):
    rows = helpers.synthetic_rows(48, seed=11)
    return tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")


@pytest.mark.parametrize("tester", TESTERS, ids=IDS)
def test_every_format_loads_to_the_same_function(tester, tokenizer, texts, tmp_path):
    model = tester.model()
    expected = logits(model, texts)
    loaded = {}
    for fmt, path in save_every_format(model, tokenizer, tmp_path).items():
        options = {} if fmt == "folder" else tester.load_options()
        src = load_source(path, **options)
        assert src.family == tester.family
        torch.testing.assert_close(logits(src.model, texts), expected, atol=2e-5, rtol=1e-5)
        loaded[fmt] = src.model.state_dict()
    for fmt in ("pt", "safetensors"):  # the same tensors whatever the file
        assert loaded[fmt].keys() == loaded["folder"].keys()
        assert all(torch.equal(loaded[fmt][k], loaded["folder"][k]) for k in loaded["folder"])


def test_albert_without_its_depth_is_one_clear_error(tokenizer, tmp_path):
    paths = save_every_format(FamilyTester("albert", depth=3).model(), tokenizer, tmp_path)
    with pytest.raises(UnknownArchitectureError, match="--layers"):
        load_source(paths["pt"])
    assert load_source(paths["pt"], layers=3).config.num_hidden_layers == 3
    assert main([str(paths["pt"]), "--bottleneck", "32", "-o", str(tmp_path / "out")]) == 2


def test_the_canonical_forms_hold_what_each_family_differs_in():
    distil = load_source(FamilyTester("distilbert").model(), require_tokenizer=False).model
    assert distil.bert.embeddings.token_type_embeddings.weight.abs().sum() == 0  # one zero row: adds nothing
    assert isinstance(distil.bert.pooler.activation, torch.nn.ReLU)
    electra = load_source(FamilyTester("electra").model(), require_tokenizer=False).model
    assert electra.config.embedding_size == 64 and electra.bert.embeddings.projection.weight.shape == (128, 64)
    albert = load_source(FamilyTester("albert", depth=3).model(), require_tokenizer=False).model
    layers = albert.bert.encoder.layer
    assert len(layers) == 3 and torch.equal(layers[0].output.dense.weight, layers[2].output.dense.weight)
    assert layers[0].output.dense.weight.data_ptr() != layers[2].output.dense.weight.data_ptr()  # unrolled copies


def test_unknown_layouts_name_the_known_families(tmp_path):
    torch.save({"encoder.blocks.0.w": torch.zeros(2, 2)}, tmp_path / "odd.pt")
    with pytest.raises(UnknownArchitectureError) as err:
        load_source(tmp_path / "odd.pt", require_tokenizer=False)
    for family in ("bert", "roberta", "uer", "distilbert", "electra", "albert"):
        assert family in str(err.value)


# ------------------------------------------------------------------------------------------- trained sources
@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """Each family trained 250 steps on the synthetic task, saved as an HF folder beside train/dev JSONL."""
    root = tmp_path_factory.mktemp("families")
    rows, dev = helpers.synthetic_rows(600, seed=21), helpers.synthetic_rows(120, seed=22)
    helpers.write_jsonl(root / "train.jsonl", rows)
    helpers.write_jsonl(root / "dev.jsonl", dev)
    out = {}
    for tester in TESTERS:
        model = helpers.train_student(tester.model(), tokenizer, rows, steps=250, lr=5e-4)
        model.save_pretrained(str(root / tester.family))
        tokenizer.save_pretrained(str(root / tester.family))
        out[tester.family] = root / tester.family
    out["train"], out["dev"] = root / "train.jsonl", root / "dev.jsonl"
    return out


@pytest.mark.parametrize("family", IDS)
def test_mapping_beats_a_random_init_on_agreement_with_the_source(family, trained):
    src = load_source(trained[family])
    calib = encode(read_examples(trained["train"], label2id=src.config.label2id).subset(128, seed=0), src.tokenizer)
    held_out = encode(read_examples(trained["dev"], label2id=src.config.label2id), src.tokenizer)
    assert held_out.labels is not None
    mobile, report = MobileBERTAdapter(ConvertConfig(bottleneck=32), progress=False).convert(src, calib)
    result = evaluate_mapping(src.model, mobile, held_out)
    assert result["source_accuracy"] > 0.8  # the source learnt the task, so agreement means something
    assert result["converted"]["agreement"] > result["random_init"]["agreement"] + 0.3
    assert result["converted"]["layer_cosine"][-1] > result["random_init"]["layer_cosine"][-1] + 0.3
    if family != "albert":  # DistilBERT's ReLU and ELECTRA's GELU heads are fitted onto a tanh pooler
        assert report["head"]["tanh_fit_r2"] > 0.9 and report["head"]["logit_agreement"] > 0.9
    if family != "distilbert":  # the factorised table is the source's own, not re-factorised
        torch.testing.assert_close(mobile.mobilebert.embeddings.word_embeddings.weight,
                                   src.model.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("family", IDS)
def test_a_trained_source_recovers_within_the_tolerance_and_loads_with_automodel(family, trained, tmp_path):
    out = tmp_path / "out"
    assert main([str(a) for a in [trained[family], "--bottleneck", "32", "--train", trained["train"], "--eval",
                                  trained["dev"], "--steps", "150", "--eval-every", "25", "--threads", "1",
                                  "-o", out]]) == 0
    conversion = json.loads((out / "conversion.json").read_text(encoding="utf-8"))
    assert conversion["source"]["family"] == family and set(conversion["source"]["mapping"]) == {
        "layers", "embedding", "head"}
    recovery = json.loads((out / "recovery.json").read_text(encoding="utf-8"))
    assert recovery["final_accuracy"] >= recovery["source_accuracy"] - 0.01  # within 1 point on dev
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.model_type == "mobilebert"


def test_prune_vocab_of_a_source_that_is_not_a_bert_folder_is_refused(trained, tmp_path, capsys):
    code = main([str(a) for a in ["prune-vocab", trained["distilbert"], "--vocab-from", trained["train"],
                                  "-o", tmp_path / "p"]])
    assert code == 2 and not (tmp_path / "p").exists()
    assert "--prune-vocab" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["distilbert", "electra"])
def test_check_and_export_read_the_family_source(family, trained, tmp_path):
    """Downstream stages load the source through the same canonical model: the check compares against it and its
    own ONNX export matches it (the ReLU/GELU head and the factorised embedding included)."""
    out = tmp_path / "out"
    assert main([str(a) for a in [trained[family], "--bottleneck", "32", "--calib", trained["train"], "-o", out]]) == 0
    code = main([str(a) for a in ["check", out, "--against", trained[family], "--data", trained["dev"], "--report",
                                  tmp_path / "report", "--repeats", "1", "--threads", "1"]])
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert code in (0, 1) and report["accuracy"]["source"] > 0.8
    assert main([str(a) for a in ["export", trained[family], "--format", "onnx", "--data", trained["dev"], "-o",
                                  tmp_path / "export"]]) == 0
    exported = json.loads((tmp_path / "export" / "export.json").read_text(encoding="utf-8"))
    assert exported["artifacts"]["onnx"]["parity"]["passed"]
