"""FP16-safe NoNorm (mbconvert.fp16): a per-channel rescaling that keeps a NoNorm MobileBERT's function and brings
its activations within FP16's range, and its wiring into `mbconvert export --fp16-safe`.

The models here are made huge on purpose without changing their function: a NoNorm's output (or a ReLU
intermediate) is multiplied per channel by 1e7 and the modules that read it divide by the same factors, written out
below independently of mbconvert.fp16. FP32 logits stay the same; FP16 overflows.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import helpers
from mbconvert.config import ExportConfig
from mbconvert.data import Encoded
from mbconvert.errors import ConfigError
from mbconvert.fp16 import make_fp16_safe

HUGE = 1e7  # random-init activations are ~0.03: ×1e7 takes them past 65504
FEEDS = ("input_ids", "attention_mask", "token_type_ids")


def texts(n: int, seed: int) -> Encoded:
    """n rows of random real tokens (ids 104..503) of 3..24 tokens, padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 25, (n, 1), generator=g)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths).long()
    return Encoded(torch.randint(104, 504, mask.shape, generator=g) * mask, mask, torch.zeros_like(mask), None)


DATA, HELD_OUT = texts(64, seed=1), texts(64, seed=2)


def mobilebert(**overrides):
    """The tests' small MobileBERT (2 layers, 2 stacked FFNs), random init, its classifier centred on DATA so the
    predicted class varies from text to text (random-init logits otherwise favour one class everywhere)."""
    from transformers import MobileBertForSequenceClassification

    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(helpers.mobilebert_config(**overrides)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)
        model.classifier.bias.sub_(logits(model, DATA).mean(0))
    return model


def logits(model, data: Encoded) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: getattr(data, k) for k in FEEDS}).logits.float()


def fp16_logits(model, data: Encoded) -> torch.Tensor:
    """PyTorch half precision on CPU."""
    return logits(copy.deepcopy(model).half(), data)


def channels(width: int, every: int, start: int = 0) -> torch.Tensor:
    f = torch.ones(width)
    f[start::every] = HUGE
    return f


def inflate(model):
    """The same function with huge activations: layer 0's output (the residual stream layer 1 reads), layer 1's
    attention output (the first stacked FFN's stream) and layer 0's last ReLU intermediate, each ×1e7 on some
    channels, with their readers compensating."""
    l0, l1 = model.mobilebert.encoder.layer
    hidden, stream, relu = channels(256, 4), channels(64, 3, 1), channels(256, 5)
    with torch.no_grad():
        for norm, f in ((l0.output.bottleneck.LayerNorm, hidden), (l1.attention.output.LayerNorm, stream)):
            norm.weight.mul_(f)
            norm.bias.mul_(f)
        for reader in (l1.bottleneck.input.dense, l1.bottleneck.attention.dense, l1.attention.self.value):
            reader.weight.div_(hidden)
        for writer, norm, f in ((l1.output.bottleneck.dense, l1.output.bottleneck.LayerNorm, hidden),
                                (l1.ffn[0].output.dense, l1.ffn[0].output.LayerNorm, stream)):
            writer.weight.mul_(f[:, None])  # the residual sum after it: dense(x) + the inflated stream
            writer.bias.mul_(f)
            norm.weight.div_(f)
        l1.ffn[0].intermediate.dense.weight.div_(stream)
        l0.intermediate.dense.weight.mul_(relu[:, None])  # relu(f·x) = f·relu(x)
        l0.intermediate.dense.bias.mul_(relu)
        l0.output.dense.weight.div_(relu)
    return model


@pytest.fixture(scope="module")
def huge():
    """(the model, its inflated copy, the copy after make_fp16_safe, the report)."""
    model = mobilebert()
    inflated = inflate(copy.deepcopy(model))
    safe = copy.deepcopy(inflated)
    return model, inflated, safe, make_fp16_safe(safe, DATA)


def test_the_inflated_model_has_the_same_function_and_overflows_fp16(huge):
    model, inflated, _, report = huge
    reference = logits(model, DATA)
    assert torch.allclose(logits(inflated, DATA), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    assert not torch.isfinite(fp16_logits(inflated, DATA)).all()
    assert report["peak_before"] > 65504 and report["fp16_headroom_before"] < 1
    assert report["fp16"]["before"]["finite"] is False


@pytest.mark.parametrize("data", [DATA, HELD_OUT], ids=["scaled-on", "held-out"])
def test_after_the_rescale_fp16_is_finite_and_agrees_with_fp32(huge, data):
    model, inflated, safe, _ = huge
    fp32, before = logits(safe, data), logits(inflated, data)
    assert float((fp32 - before).abs().max()) <= 1e-5 * float(before.abs().max())
    half = fp16_logits(safe, data)
    assert torch.isfinite(half).all()
    assert len(set(fp32.argmax(-1).tolist())) >= 3  # the agreement below is not one class everywhere
    assert float((half.argmax(-1) == fp32.argmax(-1)).float().mean()) >= 0.95
    assert float((half - fp32).abs().max()) < 0.02 * float(fp32.abs().max())


def test_every_activation_is_brought_within_the_margin(huge):
    _, _, _, report = huge
    assert report["rescaled"] and report["target"] == 65504 / 16
    assert report["peak_after"] <= report["target"] and report["fp16_headroom_after"] >= 16
    assert all(layer["peak_after"] <= report["target"] for layer in report["layers"])
    assert report["layers"][0]["peak_before"] > 65504 and report["layers"][1]["peak_before"] > 65504
    assert report["unbounded"] == [] and report["fp16"]["after"] == {"finite": True, "argmax_agreement": 1.0}
    assert report["logits"]["max_relative_change"] <= 1e-5
    names = {s["stream"] for s in report["streams"]}
    assert {"hidden.1", "layer.1.ffn.0", "layer.0.ffn.1.relu"} <= names
    json.dumps(report, allow_nan=False)


def test_only_the_channels_that_need_it_are_rescaled(huge):
    """The channels left at their size keep their weights exactly; the inflated ones are divided back."""
    model, inflated, safe, report = huge
    norm = "mobilebert.encoder.layer.0.output.bottleneck.LayerNorm.weight"
    hot = channels(256, 4) > 1
    was, now = inflated.get_parameter(norm), safe.get_parameter(norm)
    assert torch.equal(now[~hot], was[~hot]) and (now[hot].abs() < was[hot].abs() / 1000).all()
    hidden = next(s for s in report["streams"] if s["stream"] == "hidden.1")
    assert hidden["rescaled"] == int(hot.sum())
    untouched = "mobilebert.encoder.layer.0.attention.self.query.weight"  # reads a stream nobody inflated
    assert torch.equal(safe.get_parameter(untouched), model.get_parameter(untouched))


def test_a_model_within_range_is_left_unchanged_byte_for_byte():
    model = mobilebert()
    before = safetensors_bytes(model.state_dict())
    report = make_fp16_safe(model, DATA)
    assert safetensors_bytes(model.state_dict()) == before
    assert not report["rescaled"] and report["streams"] == [] and report["logits"]["max_abs_change"] == 0
    assert report["fp16_headroom_before"] >= 16 and report["fp16"]["after"]["finite"]


def test_deterministic():
    a, b = inflate(mobilebert()), inflate(mobilebert())
    assert make_fp16_safe(a, DATA) == make_fp16_safe(b, DATA)
    assert safetensors_bytes(a.state_dict()) == safetensors_bytes(b.state_dict())


def test_layer_norm_models_are_left_alone():
    model = mobilebert(normalization_type="layer_norm")
    before = safetensors_bytes(model.state_dict())
    report = make_fp16_safe(model, DATA)
    assert not report["rescaled"] and "layer_norm" in report["reason"]
    assert safetensors_bytes(model.state_dict()) == before


def test_what_cannot_be_bounded_is_named_with_the_reason():
    """Huge queries make huge attention scores, which no rescale that keeps the function can change; a huge last
    NoNorm makes the pooler's pre-tanh activations huge, and tanh is not homogeneous. (These change the function:
    only before vs after the rescale is compared.)"""
    model = mobilebert()
    layer = model.mobilebert.encoder.layer[0]
    with torch.no_grad():
        layer.attention.self.query.weight.mul_(HUGE)
        layer.attention.self.key.weight.mul_(100)
        model.mobilebert.encoder.layer[1].output.bottleneck.LayerNorm.weight.mul_(HUGE)
    before = logits(model, DATA)
    report = make_fp16_safe(model, DATA)
    assert set(report["unbounded"]) == {"layer.0.attention.scores", "mobilebert.pooler.dense"}
    entries = {e["what"]: e for e in report["not_rescalable"]}
    assert "softmax" in entries["layer.0.attention.scores"]["reason"]
    assert entries["layer.0.attention.scores"]["peak_after"] == entries["layer.0.attention.scores"]["peak_before"]
    assert entries["layer.0.attention.scores"]["peak_after"] > 65504 / 16
    assert "tanh" in entries["mobilebert.pooler.dense"]["reason"]
    assert entries["layer.1.attention.scores"]["within_target"] and entries["classifier"]["within_target"]
    assert torch.allclose(logits(model, DATA), before, rtol=1e-5, atol=0)
    query = next(s for s in report["streams"] if s["stream"] == "layer.0.query")  # queries rescaled, keys take
    key = next(s for s in report["streams"] if s["stream"] == "layer.0.key")      # the reciprocal
    assert query["max_divisor"] > 1 and key["min_divisor"] == 1 / query["max_divisor"]


def test_bad_margin_is_refused():
    with pytest.raises(ConfigError, match="margin"):
        make_fp16_safe(mobilebert(), DATA, margin=0.5)
    with pytest.raises(ConfigError, match="fp16_safe"):
        ExportConfig(fp16_safe="maybe")
    with pytest.raises(ConfigError, match="fp16_margin"):
        ExportConfig(fp16_margin=0.5)


# ---------------------------------------------------------------------------------------------- export wiring

ONNX = dict(formats=("onnx",), latency_repeats=1, latency_batch_sizes=(1,))


def test_export_rescales_a_copy_by_default_and_records_it(huge, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from mbconvert.pipeline import export_checkpoint

    _, inflated, _, _ = huge
    before = safetensors_bytes(inflated.state_dict())
    report = export_checkpoint(inflated, ExportConfig(**ONNX), out=tmp_path / "out", tokenizer=tokenizer)
    written = json.loads((tmp_path / "out" / "export.json").read_text(encoding="utf-8"))
    safe = written["fp16_safe"]
    assert safe["mode"] == "auto" and safe["rescaled"] and safe["fp16_headroom"] < 16
    assert safe["peak_before"] > 65504 and safe["peak_after"] <= 65504 / 16 and safe["unbounded"] == []
    assert written["activations"]["fp16_headroom"] < 1  # the model as given
    assert report["artifacts"]["onnx"]["parity"]["passed"]  # the rescaled ONNX file vs the given model's logits
    assert safetensors_bytes(inflated.state_dict()) == before  # the caller's model is not touched


@pytest.mark.parametrize("mode, inflated, rescaled", [("off", True, False), ("auto", False, False),
                                                     ("on", False, False)])
def test_export_leaves_the_model_when_off_or_not_needed(mode, inflated, rescaled, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from mbconvert.export import export_model

    model = inflate(mobilebert()) if inflated else mobilebert()
    report = export_model(model, tmp_path, ExportConfig(fp16_safe=mode, **ONNX))
    assert report["fp16_safe"]["mode"] == mode and report["fp16_safe"]["rescaled"] is rescaled
    if mode == "on":  # asked for: measured and nothing needed
        assert report["fp16_safe"]["streams"] == [] and report["fp16_safe"]["fp16"]["after"]["finite"]


def test_export_cli_flag(tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from mbconvert.cli import main

    folder = tmp_path / "model"
    inflate(mobilebert()).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert main(["export", str(folder), "--format", "onnx", "--fp16-safe", "off", "-o", str(tmp_path / "off")]) == 0
    assert main(["export", str(folder), "--format", "onnx", "--fp16-margin", "64", "-o", str(tmp_path / "on")]) == 0
    off, on = (json.loads((tmp_path / d / "export.json").read_text(encoding="utf-8"))["fp16_safe"]
               for d in ("off", "on"))
    assert not off["rescaled"] and on["rescaled"] and on["margin"] == 64 and on["peak_after"] <= 65504 / 64


def test_on_for_a_bert_warns_that_it_did_nothing(tmp_path):
    pytest.importorskip("onnxruntime")
    from mbconvert.export import export_model

    report = export_model(helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128), tmp_path,
                          ExportConfig(fp16_safe="on", **ONNX))
    assert not report["fp16_safe"]["rescaled"] and "BertForSequenceClassification" in report["fp16_safe"]["reason"]
    assert any(w.startswith("fp16-safe:") for w in report["warnings"])


def test_coreml_is_exported_in_fp16_after_the_rescale(tokenizer, tmp_path):
    """The model that makes Core ML fall back to FP32 without the rescale (tests/test_export.py) exports in FP16."""
    pytest.importorskip("coremltools")
    from mbconvert.pipeline import export_checkpoint

    model = inflate(mobilebert())
    cfg = ExportConfig(formats=("coreml",))
    off = export_checkpoint(model, ExportConfig(formats=("coreml",), fp16_safe="off"), out=tmp_path / "off",
                            tokenizer=tokenizer)["artifacts"]["coreml"]
    assert off["precision"] == "fp32" and not off["fp16_check"]["ok"]
    coreml = export_checkpoint(model, cfg, out=tmp_path / "out", tokenizer=tokenizer)["artifacts"]["coreml"]
    assert coreml["precision"] == "fp16" and coreml["fp16_check"]["ok"] and "warning" not in coreml
    assert coreml["fp16_check"]["peak_abs_activation"] <= 65504 / 16 and math.isfinite(
        coreml["fp16_check"]["peak_abs_activation"])
