"""`--precision mixed` (mbconvert.mixed_precision) and enumerated Core ML shapes (mbconvert.coreml).

One export (ONNX and Core ML, one Core ML conversion) of a small MobileBERT whose layer 1 is made fragile on purpose:
each of its FFNs has a dead neuron (zero input weights, bias −1: ReLU gives exactly 0) whose output weights are then
set to 1000. The function is exactly the same, but 8-bit per-channel rounding of those output projections (step
1000/127 ≈ 7.9) turns every other weight of the row into 0, destroying the layer. The rows' labels are the FP32
model's own predictions, so FP32 scores 100% and every changed prediction is a loss. The tests read the artifacts
themselves (graph initialisers, the Core ML spec), not only what export.json claims.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers
from mbconvert.config import ExportConfig
from mbconvert.errors import ConfigError

pytest.importorskip("onnxruntime")

TOLERANCE = 5.0  # points; destroying layer 1 costs far more, INT8 rounding of the healthy rest far less
FAST = dict(latency_repeats=1, latency_batch_sizes=(1,), fp16_safe="off")
ATTENTION = ["attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense",
             "bottleneck/input/dense", "bottleneck/attention/dense"]
FFN = ["ffn.0/intermediate/dense", "ffn.0/output/dense", "intermediate/dense", "output/dense",
       "output/bottleneck/dense"]
EMBEDDINGS = ["embeddings/word_embeddings", "embeddings/embedding_transformation"]


def mobilebert(vocab_size: int):
    from transformers import MobileBertForSequenceClassification

    torch.manual_seed(0)  # initializer_range 0.1: at 0.02 every layer is a near no-op and every row one class
    return MobileBertForSequenceClassification(
        helpers.mobilebert_config(num_hidden_layers=2, vocab_size=vocab_size, initializer_range=0.1)).eval()


def ffns(model, layer: int) -> list:
    block = model.mobilebert.encoder.layer[layer]
    return [*block.ffn, block]  # the stacked FFNs, then the layer's own intermediate/output


def kill_neuron(model, layer: int) -> None:
    """Neuron 0 of every FFN of `layer` dead: zero input weights, bias −1, so its ReLU gives exactly 0."""
    with torch.no_grad():
        for ffn in ffns(model, layer):
            ffn.intermediate.dense.weight[0].zero_()
            ffn.intermediate.dense.bias[0] = -1.0


def make_fragile(model, layer: int) -> None:
    """The dead neurons' output weights set to 1000: the same function (1000 · 0 = 0), but every output channel's
    8-bit step becomes 1000/127 and its other weights round to 0."""
    with torch.no_grad():
        for ffn in ffns(model, layer):
            ffn.output.dense.weight[:, 0] = 1000.0


def predictions(model, tokenizer, texts) -> list[int]:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in helpers.synthetic_rows(96, seed=3)]


@pytest.fixture(scope="module")
def fragile(tokenizer, texts):
    model = mobilebert(len(tokenizer))
    kill_neuron(model, layer=1)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        make_fragile(model, layer=1)
        after = model(**enc).logits
    assert torch.allclose(before, after, rtol=0, atol=1e-6), "making the layer fragile must keep the function"
    return model


@pytest.fixture(scope="module")
def mixed_export(fragile, tokenizer, texts, tmp_path_factory):
    """ONNX and Core ML, --precision mixed, enumerated Core ML shapes, labelled rows (the FP32 predictions)."""
    pytest.importorskip("coremltools")
    from mbconvert.pipeline import export_checkpoint

    out = tmp_path_factory.mktemp("mixed") / "export"
    cfg = ExportConfig(formats=("onnx", "coreml"), precision="mixed", tolerance=TOLERANCE, coreml_shapes="enumerated",
                       **FAST)
    labels = predictions(fragile, tokenizer, texts)
    return export_checkpoint(fragile, cfg, data=(texts, labels), out=out, tokenizer=tokenizer)


def weight_dtypes(path) -> dict[str, set[str]]:
    """Module scope of each weight-reading node (its name without the op) → the data types of the initializers
    it reads, straight from the graph."""
    import onnx

    graph = onnx.load(str(path)).graph
    dtype = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    scopes: dict[str, set[str]] = {}
    for node in graph.node:
        scope = "/".join(node.name.strip("/").split("/")[:-1])
        scopes.setdefault(scope, set()).update(
            "8-bit" if dtype[i] in ("INT8", "UINT8") else dtype[i] for i in node.input  # Gather tables: UINT8
            if i in dtype and dtype[i] in ("INT8", "UINT8", "FLOAT") and not i.endswith(("_scale", "_zero_point"))
            and not i.endswith(".bias"))
    return scopes


def test_mixed_onnx_has_int8_ffn_and_embedding_weights_and_fp32_attention(mixed_export):
    artifact = mixed_export["artifacts"]["onnx-mixed"]
    path = f"{mixed_export['out_dir']}/{artifact['file']}"
    assert artifact["file"] == "model.mixed.onnx"
    scopes = weight_dtypes(path)
    for name in EMBEDDINGS + [f"encoder/layer.0/{m}" for m in FFN]:
        assert "8-bit" in scopes[name], f"{name} should read 8-bit weights"
    for name in [f"encoder/layer.{i}/{m}" for i in (0, 1) for m in ATTENTION]:
        assert scopes[name] == {"FLOAT"}, f"{name} (attention) should read FP32 weights only, not {scopes[name]}"
    for name in [f"encoder/layer.1/{m}" for m in FFN]:  # the fragile layer, kept by the guard
        assert scopes[name] == {"FLOAT"}, f"{name} (kept at FP32) reads {scopes[name]}"
    fp32 = mixed_export["artifacts"]["onnx"]["size_mb"]
    assert artifact["size_mb"] < 0.75 * fp32 and artifact["size_ratio"] == pytest.approx(artifact["size_mb"] / fp32,
                                                                                          abs=1e-3)


def test_accuracy_guard_keeps_the_fragile_layer_at_fp32_and_reports_it(mixed_export, fragile, tokenizer, texts):
    import onnxruntime as ort

    artifact = mixed_export["artifacts"]["onnx-mixed"]
    guard = artifact["guard"]
    assert guard["ran"] and guard["accuracy_basis"] == "labels" and guard["accuracy_fp32"] == 1.0
    first, last = guard["steps"][0], guard["steps"][-1]
    assert first["kept_full_precision"] == [] and first["drop"] > 4 * TOLERANCE, "everything INT8 ruins layer 1"
    assert guard["sensitivity"][0]["unit"] == "layer.1", "layer 1 is the most sensitive"
    assert {s["unit"] for s in guard["sensitivity"]} == {"embeddings", "layer.0", "layer.1"}
    assert guard["kept_full_precision"] == ["layer.1"] == last["kept_full_precision"]
    assert artifact["full_precision_units"] == ["layer.1"]
    assert artifact["int8_units"] == ["embeddings", "layer.0"] and guard["within_tolerance"]
    assert last["drop"] <= TOLERANCE and last["size_mb"] > first["size_mb"]  # FP32 weights are bigger
    assert artifact["size_mb"] == pytest.approx(last["size_mb"], abs=0.01)  # + the metadata stamp
    # the reported accuracy is the file's own, on the export's rows (32 at a time: dynamic INT8 scales per batch)
    enc = tokenizer(texts, padding=True, return_tensors="np", return_token_type_ids=True)
    session = ort.InferenceSession(f"{mixed_export['out_dir']}/model.mixed.onnx", providers=["CPUExecutionProvider"])
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    got = np.concatenate([session.run(["logits"], {k: v[i:i + 32] for k, v in feeds.items()})[0].argmax(-1)
                          for i in range(0, len(texts), 32)])
    labels = np.array(predictions(fragile, tokenizer, texts))
    assert artifact["accuracy"] == pytest.approx(last["accuracy"])
    assert abs(float((got == labels).mean()) - artifact["accuracy"]) <= 1 / len(texts)


def mil_weights(package) -> dict[str, str]:
    """Core ML: each weight's MIL name (`wrapper_<module, _ for .>_weight…`) → how it is stored: the op that holds
    it (const, or constexpr_* for 8-bit) and, for a const, its data type."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    out = {}
    for op in block.operations:
        for o in op.outputs:
            if o.name.startswith("wrapper_") and "_weight" in o.name:
                kind = op.type
                if op.type == "const":
                    kind += ":" + ct.proto.MIL_pb2.DataType.Name(o.type.tensorType.dataType)
                out[o.name] = kind
    return out


def weight_kind(weights: dict[str, str], module: str) -> str:
    found = {k: v for k, v in weights.items() if k.startswith("wrapper_" + module.replace(".", "_") + "_weight")}
    assert found, f"no weight of {module} in the ML Program"
    return "8-bit" if any(v.startswith("constexpr_") for v in found.values()) else "/".join(sorted(found.values()))


def test_coreml_mixed_enumerated_shapes_in_the_spec(mixed_export):
    import coremltools as ct

    coreml = mixed_export["artifacts"]["coreml"]
    package = f"{mixed_export['out_dir']}/model.mlpackage"
    spec = ct.utils.load_spec(package)
    for feature in spec.description.input:
        arr = feature.type.multiArrayType
        assert arr.WhichOneof("ShapeFlexibility") == "enumeratedShapes", feature.name
        assert sorted(list(s.shape) for s in arr.enumeratedShapes.shapes) == [[1, 16], [1, 32], [1, 64], [1, 128]]
        assert list(arr.shape) == [1, 32], "default: the shortest length that holds the export's rows (≤ 22 tokens)"
        assert "enumerated: 16,32,64,128" in feature.shortDescription
    assert spec.description.metadata.userDefined["sequence_lengths"] == "enumerated: 16,32,64,128"
    assert all(sorted(i["enumerated"]) == [[1, 16], [1, 32], [1, 64], [1, 128]] and i["ranges"] is None
               for i in coreml["spec"]["inputs"])
    assert coreml["sequence_lengths"] == "enumerated: 16,32,64,128" and coreml["precision"] == "fp16"
    # attention FP16, FFN and embeddings 8-bit, the fragile layer kept (the guard on PyTorch with 8-bit rounding)
    weights = mil_weights(package)
    for module in ["embeddings.word_embeddings", "embeddings.embedding_transformation"] + [
            f"encoder.layer.0.{m.replace('/', '.')}" for m in FFN]:
        assert weight_kind(weights, module) == "8-bit", module
    for module in [f"encoder.layer.{i}.{m.replace('/', '.')}" for i in (0, 1) for m in ATTENTION] + [
            f"encoder.layer.1.{m.replace('/', '.')}" for m in FFN]:
        assert weight_kind(weights, module) == "const:FLOAT16", module
    guard = coreml["mixed"]["guard"]
    assert guard["kept_full_precision"] == ["layer.1"] and guard["steps"][0]["drop"] > 4 * TOLERANCE
    assert guard["within_tolerance"] and "simulated" in guard["basis"]


def test_without_data_the_guard_does_not_run_and_says_so(fragile, tokenizer, tmp_path, caplog):
    import logging

    from mbconvert.pipeline import export_checkpoint

    cfg = ExportConfig(formats=("onnx",), precision="mixed", **FAST)
    with caplog.at_level(logging.WARNING, logger="mbconvert"):
        report = export_checkpoint(fragile, cfg, out=tmp_path / "out", tokenizer=tokenizer)
    artifact = report["artifacts"]["onnx-mixed"]
    assert not artifact["guard"]["ran"] and "--data" in artifact["guard"]["reason"]
    assert artifact["int8_units"] == ["embeddings", "layer.0", "layer.1"] and artifact["full_precision_units"] == []
    assert artifact["accuracy"] is None and "accuracy guard not run" in artifact["warning"]
    assert any("accuracy guard not run" in w for w in report["warnings"])
    assert any("accuracy guard not run" in r.getMessage() for r in caplog.records)
    assert "8-bit" in weight_dtypes(tmp_path / "out" / "model.mixed.onnx")["encoder/layer.1/ffn.0/output/dense"]


# ------------------------------------------------------------------------------------- the guard on its own

def test_guard_keeps_the_most_sensitive_units_one_by_one_until_within_tolerance():
    """A made-up model of 4 units: quantising `bad` flips 6 of 20 rows, `meh` 2, the others none."""
    from mbconvert.mixed_precision import Trial, accuracy_guard

    reference = np.tile(np.array([[2.0, 0.0]]), (20, 1))
    labels = np.zeros(20, dtype=int)
    flips = {"bad": 6, "meh": 2, "ok": 0, "fine": 0}
    calls = []

    def evaluate(quantised):
        calls.append(list(quantised))
        logits = reference.copy()
        n = sum(flips[u] for u in quantised)
        logits[:n] = [0.0, 2.0]
        logits[n:] -= [0.01 * len(quantised), 0]  # a little KL per quantised unit
        return Trial(logits, size_mb=1.0 + 3.0 * (4 - len(quantised)))

    guard = accuracy_guard(evaluate, list(flips), reference, labels, tolerance=5.0)
    assert [s["unit"] for s in guard["sensitivity"]][:2] == ["bad", "meh"]
    assert [s["kept_full_precision"] for s in guard["steps"]] == [[], ["bad"], ["bad", "meh"]]
    assert [s["drop"] for s in guard["steps"]] == [40.0, 10.0, 0.0]
    assert guard["kept_full_precision"] == ["bad", "meh"] and guard["quantised"] == ["ok", "fine"]
    assert guard["within_tolerance"] and guard["steps"][-1]["size_mb"] == 7.0
    assert calls[0] == list(flips) and calls[1:5] == [[u] for u in flips]  # all, then each unit alone

    quiet = accuracy_guard(evaluate, ["ok", "fine"], reference, labels, tolerance=5.0)
    assert quiet["sensitivity"] == [] and len(quiet["steps"]) == 1 and quiet["kept_full_precision"] == []


def test_units_split_attention_from_ffn_and_embeddings(fragile):
    from mbconvert.mixed_precision import weight_units

    units = weight_units(fragile)
    assert list(units) == ["embeddings", "layer.0", "layer.1"]
    assert set(units["embeddings"]) == {"embeddings.word_embeddings", "embeddings.embedding_transformation",
                                        "embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    assert sorted(units["layer.1"]) == sorted(f"encoder.layer.1.{m.replace('/', '.')}" for m in FFN)
    bert = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    assert weight_units(bert)["layer.0"] == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]


# ------------------------------------------------------------------------------------- options

def test_enumerated_lengths_are_capped_at_max_seq_len_and_the_positions():
    from mbconvert.coreml import sequence_lengths

    assert sequence_lengths(ExportConfig(coreml_shapes="enumerated"), 512) == [16, 32, 64, 128]
    assert sequence_lengths(ExportConfig(coreml_shapes="enumerated", max_seq_len=50), 512) == [16, 32, 50]
    odd = ExportConfig(coreml_shapes="enumerated", coreml_lengths=(128, 8, 300))
    assert sequence_lengths(odd, 256) == [8, 128, 256]


def test_rows_are_padded_to_an_enumerated_length_for_prediction():
    from mbconvert.coreml import prediction_inputs
    from mbconvert.export import Inputs

    ids = np.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    rows = Inputs(ids, (ids > 0).astype(np.int64), np.zeros_like(ids), None, "data")
    enumerated = ExportConfig(coreml_shapes="enumerated", coreml_lengths=(2, 8, 16))
    got = prediction_inputs(rows, enumerated, 512)
    assert got.seq_len == 8 and (got.input_ids[:, :4] == ids).all() and (got.input_ids[:, 4:] == 0).all()
    assert (got.attention_mask[:, 4:] == 0).all() and got.attention_mask[:, :4].tolist() == rows.attention_mask.tolist()
    assert prediction_inputs(rows, ExportConfig(coreml_shapes="enumerated", coreml_lengths=(2, 3)), 512) is None
    assert prediction_inputs(rows, ExportConfig(), 512) is rows


def test_conflicting_options_are_config_errors():
    with pytest.raises(ConfigError, match="precision must be one of"):
        ExportConfig(precision="int4")
    with pytest.raises(ConfigError, match="give one of them"):
        ExportConfig(precision="mixed", coreml_quantize=True)
    with pytest.raises(ConfigError, match="coreml-precision fp32"):
        ExportConfig(precision="mixed", coreml_precision="fp32")
    with pytest.raises(ConfigError, match="seq-len"):
        ExportConfig(coreml_shapes="enumerated", seq_len=32)
    with pytest.raises(ConfigError, match="coreml_lengths entry"):
        ExportConfig(coreml_lengths=(16, 0))


def test_cli_reads_precision_shapes_and_lengths(capsys):
    from mbconvert.cli import _config, build_parser, main

    a = build_parser("export").parse_args(["m", "--precision", "mixed", "--coreml-shapes", "enumerated",
                                           "--coreml-lengths", "8,24", "--tolerance", "0.5"])
    cfg = _config(ExportConfig, a)
    assert (cfg.precision, cfg.coreml_shapes, cfg.coreml_lengths) == ("mixed", "enumerated", (8, 24))
    assert cfg.tolerance == 0.5
    assert main(["export", "m", "--coreml-lengths", "16,x"]) == 2
    assert "coreml-lengths" in capsys.readouterr().err
