"""Mobile runtimes (mbconvert.mobile_runtimes): ExecuTorch (.pte, XNNPACK delegate) and LiteRT (.tflite), FP32 and
8-bit, for a tiny MobileBERT. Each file is then run here by its own runtime's Python API (not mbconvert's helpers)
on a padded batch and compared with the Hugging Face model, independently of what export.json claims.

Stated tolerances, on logits scaled to a largest |logit| of LOGIT_SCALE: FP32 files within 1e-4 (ExportConfig's
parity_atol) with identical argmax; 8-bit files within INT8_ATOL with at least INT8_AGREEMENT argmax agreement.
Each backend's tests skip when its extra (`mbconvert[executorch]`, `mbconvert[litert]`) is not installed; the
missing-backend tests run everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from mbconvert.config import ExportConfig
from mbconvert.errors import MissingDependencyError
from mbconvert.pipeline import export_checkpoint

LOGIT_SCALE = 5.0
FP32_ATOL = 1e-4
INT8_ATOL, INT8_AGREEMENT = 0.25, 0.8  # 5% of LOGIT_SCALE
FAST = dict(latency_repeats=2, latency_batch_sizes=(1, 4))
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def scaled_mobilebert(vocab_size: int, texts: list[str], tokenizer):
    """A 1-layer random MobileBERT whose classifier is scaled so its largest |logit| on `texts` is LOGIT_SCALE
    (random init gives ~0.003, where any tolerance would pass)."""
    from transformers import MobileBertForSequenceClassification

    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(helpers.mobilebert_config(num_hidden_layers=1,
                                                                          vocab_size=vocab_size)).eval()
    with torch.no_grad():
        peak = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.abs().max()
        model.classifier.weight.mul_(LOGIT_SCALE / peak)
        model.classifier.bias.mul_(LOGIT_SCALE / peak)
    return model


@pytest.fixture(scope="module")
def rows():
    return [{"text": r["text"], "label": helpers.LABELS.index(r["label"])} for r in helpers.synthetic_rows(24, seed=3)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, rows):
    return helpers.write_jsonl(tmp_path_factory.mktemp("data") / "test.jsonl", rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, rows):
    d = tmp_path_factory.mktemp("mobilebert")
    scaled_mobilebert(len(tokenizer), [r["text"] for r in rows], tokenizer).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def executorch_export(model_dir, data_file):
    pytest.importorskip("executorch")
    return export_checkpoint(str(model_dir), ExportConfig(formats=("executorch", "executorch-int8"), **FAST),
                             data=str(data_file))


@pytest.fixture(scope="module")
def litert_export(model_dir, data_file):
    pytest.importorskip("litert_torch")
    return export_checkpoint(str(model_dir), ExportConfig(formats=("litert", "litert-int8"), **FAST),
                             data=str(data_file))


def padded_batch(tokenizer, n=5, width=None):
    """Texts other than the export's rows, padded to the longest (or padded/truncated to `width`)."""
    texts = [r["text"] for r in helpers.synthetic_rows(n, seed=11)]
    enc = tokenizer(texts, padding="max_length" if width else True, max_length=width, truncation=bool(width),
                    return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in NAMES}


def pytorch_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def assert_close(got, want, atol, agreement):
    assert np.abs(want).max() > LOGIT_SCALE / 2, "logits too small for the tolerance to mean anything"
    assert np.abs(got - want).max() <= atol
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= agreement


# ------------------------------------------------------------------------------------- ExecuTorch

def executorch_run(path: Path, feeds) -> np.ndarray:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return method.execute([torch.from_numpy(feeds[name]) for name in NAMES])[0].numpy()


def test_executorch_files_run_in_the_executorch_runtime_and_match_pytorch(executorch_export, hf_model, tokenizer):
    """A batch size and padded width the export never saw (dynamic axes), and the shortest accepted length."""
    folder = Path(executorch_export["out_dir"])
    batch, shortest = padded_batch(tokenizer, n=5), padded_batch(tokenizer, n=3, width=3)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    assert batch["input_ids"].shape[1] != executorch_export["inputs"]["seq_len"], "a width the export never saw"
    for feeds in (batch, shortest):
        want = pytorch_logits(hf_model, feeds)
        assert_close(executorch_run(folder / "model.pte", feeds), want, FP32_ATOL, 1.0)
        assert_close(executorch_run(folder / "model.int8.pte", feeds), want, INT8_ATOL, INT8_AGREEMENT)


def test_executorch_report_xnnpack_delegation_sizes_and_latency(executorch_export):
    folder = Path(executorch_export["out_dir"])
    fp32, int8 = (executorch_export["artifacts"][f] for f in ("executorch", "executorch-int8"))
    assert list(executorch_export["artifacts"]) == ["executorch", "executorch-int8"]
    assert fp32["parity"]["passed"] and fp32["parity"]["max_abs_diff"] <= FP32_ATOL
    assert int8["vs_fp32"]["max_abs_diff"] <= INT8_ATOL and int8["vs_fp32"]["argmax_agreement"] >= INT8_AGREEMENT
    assert int8["accuracy_basis"] == "labels"
    assert int8["accuracy_fp32"] == executorch_export["inputs"]["pytorch_accuracy"]
    for entry in (fp32, int8):
        assert b"XnnpackBackend" in (folder / entry["file"]).read_bytes()
        d = entry["delegation"]
        assert d["delegate"] == "XnnpackBackend" and d["subgraphs"] >= 1
        for op in ("aten_linear_default", "aten_bmm_default", "aten__softmax_default"):
            assert op in d["delegated_ops"] and op not in d["portable_ops"], op
        assert entry["shapes"] == {"batch": [1, 1024], "sequence": [3, 512]}
        assert set(entry["latency"]) == {"batch1_ms", "batch4_ms"} and all(v > 0 for v in entry["latency"].values())
    assert int8["size_mb"] < 0.6 * fp32["size_mb"]
    on_disk = json.loads((folder / "export.json").read_text())
    assert on_disk["versions"]["executorch"] and on_disk["config"]["formats"] == ["executorch", "executorch-int8"]
    assert {"config.json", "tokenizer.json", "model.pte", "model.int8.pte"} <= {p.name for p in folder.iterdir()}


def test_executorch_fixed_seq_len_exports_one_sequence_length(model_dir, tmp_path):
    pytest.importorskip("executorch")
    report = export_checkpoint(str(model_dir), ExportConfig(formats=("executorch",), seq_len=16, **FAST),
                               out=tmp_path / "out")
    entry = report["artifacts"]["executorch"]
    assert entry["shapes"]["sequence"] == [16, 16] and entry["parity"]["passed"]


# ------------------------------------------------------------------------------------- LiteRT

def litert_run(path: Path, feeds) -> np.ndarray:
    """Row by row through the interpreter's serving_default signature (the file's shape is [1, seq_len])."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    rows = len(feeds["input_ids"])
    return np.concatenate([next(iter(runner(**{k: v[i:i + 1].astype(np.int32) for k, v in feeds.items()}).values()))
                           for i in range(rows)])


def test_litert_files_run_in_the_litert_interpreter_and_match_pytorch(litert_export, hf_model, tokenizer):
    from ai_edge_litert.interpreter import Interpreter

    folder, width = Path(litert_export["out_dir"]), litert_export["inputs"]["seq_len"]
    for name in ("model.tflite", "model.int8.tflite"):
        details = Interpreter(model_path=str(folder / name)).get_signature_runner().get_input_details()
        assert set(details) == set(NAMES), name
        assert all(list(d["shape"]) == [1, width] and d["dtype"] == np.int32 for d in details.values()), name
    feeds = padded_batch(tokenizer, n=5, width=width)
    assert (feeds["attention_mask"] == 0).any(), "the batch must contain padding"
    want = pytorch_logits(hf_model, feeds)
    assert_close(litert_run(folder / "model.tflite", feeds), want, FP32_ATOL, 1.0)
    assert_close(litert_run(folder / "model.int8.tflite", feeds), want, INT8_ATOL, INT8_AGREEMENT)


def test_litert_report_sizes_and_latency(litert_export):
    fp32, int8 = (litert_export["artifacts"][f] for f in ("litert", "litert-int8"))
    assert fp32["parity"]["passed"] and int8["vs_fp32"]["argmax_agreement"] >= INT8_AGREEMENT
    width = litert_export["inputs"]["seq_len"]
    for entry in (fp32, int8):
        assert entry["shapes"] == {"batch": [1, 1], "sequence": [width, width]} and entry["input_dtype"] == "int32"
        assert list(entry["latency"]) == ["batch1_ms"] and entry["latency"]["batch1_ms"] > 0
    assert int8["size_mb"] < 0.5 * fp32["size_mb"]


def test_litert_int8_alone_leaves_no_fp32_file(model_dir, tmp_path):
    pytest.importorskip("litert_torch")
    report = export_checkpoint(str(model_dir), ExportConfig(formats=("litert-int8",), seq_len=16, **FAST),
                               out=tmp_path / "out")
    assert list(report["artifacts"]) == ["litert-int8"]
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.int8.tflite" in written and "model.tflite" not in written


# ------------------------------------------------------------------------------------- without the backends

@pytest.mark.parametrize("module, fmt, extra", [("executorch", "executorch-int8", "executorch"),
                                                ("litert_torch", "litert", "litert")])
def test_missing_backend_names_its_extra(model_dir, tmp_path, monkeypatch, capsys, module, fmt, extra):
    from mbconvert.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=rf"pip install 'mbconvert\[{extra}\]'"):
        export_checkpoint(str(model_dir), ExportConfig(formats=(fmt,)), out=tmp_path / "api")
    assert main(["export", str(model_dir), "--format", fmt, "-o", str(tmp_path / "cli")]) == 2
    assert f"pip install 'mbconvert[{extra}]'" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() and not (tmp_path / "api").exists()


def test_default_formats_skip_missing_mobile_backends_naming_their_extras(monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mbconvert.export import resolve_formats

    for module in ("executorch", "litert_torch"):
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level(logging.INFO, logger="mbconvert"):
        formats = resolve_formats(ExportConfig()).formats
    assert "onnx" in formats and not {"executorch", "executorch-int8", "litert", "litert-int8"} & set(formats)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "executorch-int8 (needs executorch): pip install 'mbconvert[executorch]'" in skipped[0]
    assert "litert-int8 (needs litert_torch and ai_edge_litert and ai_edge_quantizer)" in skipped[0]
    assert "pip install 'mbconvert[litert]'" in skipped[0]
