"""Activation ranges (mbconvert.numerics): the peak |activation| per layer and module over real tokens, and the FP16
headroom, in conversion.json, recovery.json and export.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

import helpers
from mbconvert.data import Encoded
from mbconvert.numerics import activation_peaks

SCALED = "mobilebert.encoder.layer.1.output.bottleneck.LayerNorm"  # the last NoNorm: no residual sum after it


def mobilebert(scale: float = 1.0):
    from transformers import MobileBertForSequenceClassification

    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(helpers.mobilebert_config()).eval()
    with torch.no_grad():  # NoNorm is an unbounded affine map: scaling one mimics MobileBERT's huge activations
        # (random-init activations are ~0.03: ×1e7 takes them past 65504)
        model.get_submodule(SCALED).weight.mul_(scale)
    return model


def rows(lengths, pad_id: int = 0, pad_type: int = 0) -> Encoded:
    """Rows of random real tokens (ids 104..) of the given lengths, padded to the longest: [PAD] right after the
    text (MobileBERT's trigram embeddings read the next token), then `pad_id` with segment `pad_type`."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    position, length = torch.arange(width)[None, :], torch.tensor(lengths)[:, None]
    mask = (position < length).long()
    beyond = (position > length).long()
    ids = torch.randint(104, 504, (len(lengths), width), generator=g) * mask + pad_id * beyond
    return Encoded(ids, mask, pad_type * beyond, None)


def test_a_scaled_nonorm_overflows_fp16_and_is_located():
    data = rows([12, 7, 3, 12, 9])
    normal, huge = activation_peaks(mobilebert(), data), activation_peaks(mobilebert(1e7), data)
    assert 1 < normal["fp16_headroom"] < math.inf and normal["peak"] < 65504
    assert huge["peak"] > 65504 and huge["fp16_headroom"] < 1 and huge["module"] == SCALED
    first, second = huge["layers"]
    assert second["module"] == SCALED and second["fp16_headroom"] < 1 and second["layer"] == 1
    assert first["fp16_headroom"] > 1 and first["peak"] == normal["layers"][0]["peak"]
    stacked = "mobilebert.encoder.layer.0.ffn.0.intermediate"
    for name in (f"{stacked}.dense", stacked, "mobilebert.encoder.layer.0.attention",  # FFN pre-ReLU and post
                 "mobilebert.encoder.layer.0", "mobilebert.encoder.layer.0.output.bottleneck.LayerNorm"):
        assert name in first["modules"]
    assert huge["embeddings"]["module"].startswith("mobilebert.embeddings")
    assert huge["peak"] == max(max(layer["peak"] for layer in huge["layers"]), huge["embeddings"]["peak"],
                               huge["head"]["peak"])


def test_padding_positions_do_not_count():
    """Padded positions holding a token with a huge embedding (and another segment id) leave the peak unchanged."""
    model = mobilebert()
    with torch.no_grad():
        model.mobilebert.embeddings.word_embeddings.weight[5].mul_(1e6)
    lengths = [12, 7, 3, 9]
    plain, garbage = activation_peaks(model, rows(lengths)), activation_peaks(model, rows(lengths, 5, 1))
    assert garbage["peak"] == pytest.approx(plain["peak"], rel=1e-5)
    assert garbage["layers"][1]["peak"] == pytest.approx(plain["layers"][1]["peak"], rel=1e-5)
    real = rows(lengths)
    real.input_ids[0, 4] = 5  # the same token where it is real does count
    assert activation_peaks(model, real)["peak"] > 100 * plain["peak"]


def test_works_for_a_bert_source_and_leaves_the_model_as_it_was():
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = activation_peaks(model, rows([10, 4, 8]), batch_size=2)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert "bert.encoder.layer.1.intermediate.dense" in report["layers"][1]["modules"]
    assert report["rows"] == 3 and 0 < report["fp16_headroom"] < math.inf
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_max_rows_limits_the_rows():
    assert activation_peaks(mobilebert(), rows([5, 6, 7, 8]), max_rows=2)["rows"] == 2


def test_export_json_reports_activations_on_its_inputs(tmp_path):
    from mbconvert.config import ExportConfig
    from mbconvert.export import export_model

    report = export_model(mobilebert(1e7), tmp_path, ExportConfig(formats=("onnx",), latency_repeats=1))
    activations = report["activations"]
    assert activations["rows"] == report["inputs"]["rows"] and activations["module"] == SCALED
    assert activations["fp16_headroom"] < 1
    json.dumps(report, allow_nan=False)


def test_conversion_and_recovery_json_hold_the_activation_section(small_student, tmp_path):
    from mbconvert.cli import main

    d, out = small_student, tmp_path / "out"
    assert main([str(a) for a in [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--calib",
                                  d / "train.jsonl", "--calib-samples", "32", "--train", d / "train.jsonl",
                                  "--eval", d / "dev.jsonl", "--steps", "2", "--batch-size", "16", "--threads", "1",
                                  "-o", out]]) == 0
    conversion = json.loads((out / "conversion.json").read_text(encoding="utf-8"))["activations"]
    recovery = json.loads((out / "recovery.json").read_text(encoding="utf-8"))["activations"]
    assert conversion["rows"] == 200 - 32 and recovery["rows"] == 40  # held-out texts; the eval rows
    for section in (conversion, recovery):
        assert 0 < section["fp16_headroom"] < math.inf and len(section["layers"]) == 2
        assert section["module"].startswith("mobilebert.")
