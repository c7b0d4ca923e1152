"""Export (mbconvert.export): ONNX FP32/INT8 and Core ML for a small MobileBERT and a small BERT student.

Each model is exported once per module (fixtures); the tests then check the artifacts independently of
the numbers export.json claims: onnxruntime on a padded batch with a real attention mask, the Core ML spec.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from mbconvert.config import ExportConfig
from mbconvert.errors import ConfigError, MissingDependencyError

pytest.importorskip("onnxruntime")
pytest.importorskip("coremltools")

from mbconvert.export import onnx_latency  # noqa: E402
from mbconvert.pipeline import export_checkpoint  # noqa: E402

FAST = dict(latency_repeats=2)


def mobilebert(vocab_size: int, layers: int = 2, scale_nonorm: float = 1.0):
    from transformers import MobileBertForSequenceClassification

    cfg = helpers.mobilebert_config(num_hidden_layers=layers, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # NoNorm is an unbounded affine map: scaling it mimics MobileBERT's huge activations
        for module in model.modules():
            if type(module).__name__ == "NoNorm":
                module.weight.mul_(scale_nonorm)
    return model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Labelled rows of 7–22 characters (padded batches), labels as ids so any model's labels fit."""
    rows = [{"text": r["text"], "label": helpers.LABELS.index(r["label"])} for r in helpers.synthetic_rows(48, seed=3)]
    return helpers.write_jsonl(tmp_path_factory.mktemp("data") / "test.jsonl", rows)


@pytest.fixture(scope="module")
def mobilebert_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("mobilebert")
    mobilebert(len(tokenizer)).save_pretrained(str(d))  # 504 rows: one per tokenizer entry
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def student_file(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("student")
    torch.save(helpers.random_student(hidden=128, layers=2, heads=2).state_dict(), d / "student.pt")
    tokenizer.save_pretrained(str(d))
    return d / "student.pt"


@pytest.fixture(scope="module")
def mobilebert_export(mobilebert_dir, data_file):
    """All formats, flexible sequence length, parity and accuracy on the data file."""
    return export_checkpoint(str(mobilebert_dir), ExportConfig(**FAST), data=str(data_file))


@pytest.fixture(scope="module")
def student_export(student_file):
    """All formats at a fixed length of 32, synthetic inputs (no --data), 8-bit Core ML weights."""
    return export_checkpoint(str(student_file), ExportConfig(seq_len=32, coreml_quantize=True, **FAST))


def padded_batch(tokenizer, width=None):
    texts = [r["text"] for r in helpers.synthetic_rows(6, seed=9)]
    kw = dict(padding="max_length", max_length=width) if width else dict(padding=True)
    enc = tokenizer(texts, return_tensors="pt", return_token_type_ids=True, **kw)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc


def check_onnx_file(path, model, enc):
    """Run the .onnx with onnxruntime on `enc` and compare with the PyTorch model itself."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    return proto


def test_mobilebert_onnx_matches_pytorch_on_a_padded_batch(mobilebert_dir, mobilebert_export, tokenizer):
    from transformers import AutoModelForSequenceClassification

    onnx_report = mobilebert_export["artifacts"]["onnx"]
    assert onnx_report["parity"]["passed"] and onnx_report["parity"]["max_abs_diff"] <= 1e-4
    assert onnx_report["parity"]["argmax_agreement"] == 1.0 and onnx_report["parity"]["samples"] == 48
    model = AutoModelForSequenceClassification.from_pretrained(str(mobilebert_dir), attn_implementation="eager")
    proto = check_onnx_file(mobilebert_dir / "export" / "model.onnx", model.eval(), padded_batch(tokenizer))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert all(isinstance(b, str) and isinstance(s, str) for b, s in dims), "batch and sequence must be dynamic"


def test_student_exports_like_mobilebert_with_fixed_length(student_file, student_export, tokenizer):
    from mbconvert.load import load_classifier

    assert student_export["out_dir"] == str(student_file.parent / "student-export")
    assert student_export["model"]["type"] == "BertForSequenceClassification"
    assert student_export["inputs"]["source"] == "synthetic" and student_export["inputs"]["seq_len"] == 32
    assert student_export["artifacts"]["onnx"]["parity"]["passed"]
    model, _ = load_classifier(student_file)
    check_onnx_file(student_file.parent / "student-export" / "model.onnx", model, padded_batch(tokenizer, 32))


@pytest.mark.parametrize("which", ["mobilebert_export", "student_export"])
def test_int8_is_smaller_and_reports_agreement_and_latency(which, request):
    report = request.getfixturevalue(which)
    fp32, int8 = report["artifacts"]["onnx"], report["artifacts"]["onnx-int8"]
    assert int8["size_mb"] < fp32["size_mb"] and int8["size_ratio"] < 0.5
    assert 0.0 <= int8["vs_fp32"]["argmax_agreement"] <= 1.0
    assert int8["mode"] == "dynamic"
    for artifact in (fp32, int8):
        assert set(artifact["latency"]) == {"batch1_ms", "batch32_ms"}
        assert all(v > 0 for v in artifact["latency"].values())
    out = json.loads((Path(report["out_dir"]) / "export.json").read_text())
    assert out["schema_version"] == 1 and out["artifacts"]["onnx-int8"]["size_mb"] == int8["size_mb"]
    assert {"mbconvert", "torch", "onnxruntime", "coremltools"} <= set(out["versions"])


def test_versions_name_mbconvert_the_core_packages_and_the_backends_asked_for():
    """One versions() for every report: installed packages have a version, missing ones None."""
    import mbconvert
    from mbconvert.environment import versions

    v = versions("onnxruntime", "no-such-package-mbconvert")
    assert v["mbconvert"] == mbconvert.__version__ and v["torch"] == torch.__version__
    assert v["numpy"] == np.__version__ and v["onnxruntime"] and v["no-such-package-mbconvert"] is None
    assert {"python", "platform", "cpu_count", "transformers"} <= set(v)


def test_int8_accuracy_is_measured_on_labelled_data(mobilebert_export):
    int8 = mobilebert_export["artifacts"]["onnx-int8"]
    assert int8["accuracy_basis"] == "labels"
    assert int8["accuracy_drop"] == pytest.approx(100 * (int8["accuracy_fp32"] - int8["accuracy"]), abs=1e-4)  # points
    assert mobilebert_export["inputs"]["pytorch_accuracy"] == pytest.approx(int8["accuracy_fp32"])


def test_int8_accuracy_drop_beyond_tolerance_warns(mobilebert_dir, data_file, tmp_path, caplog):
    cfg = ExportConfig(formats=("onnx-int8",), **FAST)
    cfg.tolerance = -1.0  # past validation on purpose: any result "drops" more than this
    with caplog.at_level(logging.WARNING, logger="mbconvert"):
        report = export_checkpoint(str(mobilebert_dir), cfg, data=str(data_file), out=tmp_path / "out")
    assert "more than the tolerance" in report["artifacts"]["onnx-int8"]["warning"]
    assert any("onnx-int8" in w for w in report["warnings"])
    assert any("more than the tolerance" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "model.onnx").is_file(), "onnx-int8 keeps its FP32 basis"


def test_coreml_package_spec_flexible_and_fixed_lengths(mobilebert_dir, mobilebert_export, student_export):
    import coremltools as ct

    spec = ct.utils.load_spec(str(mobilebert_dir / "export" / "model.mlpackage"))
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs", "logits"]
    assert spec.WhichOneof("Type") == "mlProgram"
    flexible = mobilebert_export["artifacts"]["coreml"]
    assert flexible["precision"] == "fp16" and flexible["fp16_check"]["ok"]
    assert all(i["ranges"] == [[1, 1], [1, 512]] for i in flexible["spec"]["inputs"])
    assert flexible["spec"]["outputs"][2] == {"name": "logits", "type": "multiArrayType", "shape": [1, 4], "ranges": None}
    assert flexible["spec"]["mil_ops"] > 50 and 0 < flexible["spec"]["weights_mb"] <= flexible["size_mb"]
    fixed = student_export["artifacts"]["coreml"]
    assert all(i["shape"] == [1, 32] and i["ranges"] is None for i in fixed["spec"]["inputs"])
    fp32_mb = student_export["artifacts"]["onnx"]["size_mb"]
    assert fixed["weights_8bit"] and fixed["spec"]["weights_mb"] < 0.35 * fp32_mb  # 1 byte vs 4 per weight
    if sys.platform != "darwin":
        assert flexible["parity"] is None and "macOS" in flexible["note"]
    for export in (mobilebert_export, student_export):  # FP16, 8-bit weights: classifiers fed by the softmax
        assert export["artifacts"]["coreml"]["spec"]["classifier"] == {"label": "classLabel",
                                                                       "probabilities": "classLabel_probs"}
        package = ct.utils.load_spec(str(Path(export["out_dir"]) / "model.mlpackage"))
        id2label = json.loads((Path(export["out_dir"]) / "config.json").read_text())["id2label"]
        assert coreml_class_labels(package) == [id2label[str(i)] for i in range(4)]
        assert coreml_probabilities_input(package) in ("probabilities", "probabilities_cast_to_fp32")  # not logits


def test_coreml_falls_back_to_fp32_when_fp16_would_overflow(tokenizer, tmp_path, caplog):
    model = mobilebert(len(tokenizer), layers=1, scale_nonorm=30.0)  # one layer: half the conversion time
    cfg = ExportConfig(formats=("coreml",), fp16_safe="off")
    with caplog.at_level(logging.WARNING, logger="mbconvert"):
        report = export_checkpoint(model, cfg, out=tmp_path / "out", tokenizer=tokenizer)
    coreml = report["artifacts"]["coreml"]
    assert not coreml["fp16_check"]["ok"] and coreml["fp16_check"]["peak_abs_activation"] > 65504
    assert coreml["precision"] == "fp32" and "FP32 compute precision" in coreml["warning"]
    assert (tmp_path / "out" / "model.mlpackage").is_dir()
    assert any("FP16 would overflow" in r.getMessage() for r in caplog.records)


def test_missing_extra_names_the_install_command(mobilebert_dir, monkeypatch, capsys):
    from mbconvert.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"mbconvert\[export\]"):
        export_checkpoint(str(mobilebert_dir), ExportConfig(formats=("onnx",)))
    assert main(["export", str(mobilebert_dir), "--format", "onnx"]) == 2
    assert "pip install 'mbconvert[export]'" in capsys.readouterr().err


def test_bad_options_are_config_errors(mobilebert_dir):
    with pytest.raises(ConfigError, match="format must be one of"):
        ExportConfig(formats=("tflite",))
    with pytest.raises(ConfigError, match="calibration"):
        export_checkpoint(str(mobilebert_dir), ExportConfig(formats=("onnx-int8",), int8_static=True))
    with pytest.raises(ConfigError, match="seq-len"):
        export_checkpoint(str(mobilebert_dir), ExportConfig(formats=("onnx",), seq_len=100_000))


def test_cli_export_onnx_writes_export_json(mobilebert_dir, tmp_path, capsys):
    from mbconvert.cli import main

    out = tmp_path / "cli-export"
    assert main(["export", str(mobilebert_dir), "--format", "onnx", "--seq-len", "16", "-o", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert list(report["artifacts"]) == ["onnx"] and report["artifacts"]["onnx"]["parity"]["passed"]
    written = {p.name for p in out.iterdir() if p.name != ".mbconvert"}
    assert {"export.json", "model.onnx", "config.json", "tokenizer.json", "vocab.txt"} <= written
    assert not written & {"model.int8.onnx", "model.mlpackage"}, "only the format asked for"
    assert "model.onnx" in capsys.readouterr().out


def test_onnx_latency_helper(student_export):
    path = f"{student_export['out_dir']}/model.int8.onnx"
    assert onnx_latency(path, batch=2, seq_len=32, threads=1, warmup=1, repeats=2) > 0


# ------------------------------------------------------------------------------------- what an app needs

def test_export_folder_loads_like_a_hugging_face_folder(mobilebert_dir, mobilebert_export):
    """The folder alone runs the model: its tokenizer + onnxruntime on model.onnx give PyTorch's logits."""
    import onnxruntime as ort
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(mobilebert_export["out_dir"])
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in folder.iterdir()}
    config = AutoConfig.from_pretrained(str(folder))
    assert [config.id2label[i] for i in range(config.num_labels)] == helpers.LABELS
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok([r["text"] for r in helpers.synthetic_rows(6, seed=9)], padding=True, return_tensors="np")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    got = session.run(["logits"], feeds)[0]
    model = AutoModelForSequenceClassification.from_pretrained(str(mobilebert_dir), attn_implementation="eager")
    with torch.no_grad():
        want = model.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_onnx_files_carry_labels_and_mbconvert_version(mobilebert_export):
    import onnxruntime as ort

    import mbconvert

    folder = Path(mobilebert_export["out_dir"])
    for name in ("model.onnx", "model.int8.onnx"):
        meta = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"]).get_modelmeta()
        props = meta.custom_metadata_map
        assert json.loads(props["id2label"]) == {str(i): n for i, n in enumerate(helpers.LABELS)}, name
        assert props["mbconvert_version"] == mbconvert.__version__, name


def coreml_class_labels(spec) -> list:
    """The class names of the ML Program's classify op, in the order Core ML indexes them."""
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    classify = next(op for op in block.operations if op.type == "classify")
    values = classify.inputs["classes"].arguments[0].value.immediateValue.list.values
    return [v.immediateValue.tensor.strings.values[0] for v in values]


def coreml_probabilities_input(spec) -> str:
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    return next(op for op in block.operations if op.type == "classify").inputs["probabilities"].arguments[0].name


def test_coreml_package_is_a_classifier_in_label_id_order(tokenizer, tmp_path):
    """Labels deliberately not in alphabetical order: Core ML's class labels must follow the ids."""
    import coremltools as ct

    import mbconvert

    names = ["zeta", "alpha", "mid", "beta"]
    model = mobilebert(len(tokenizer), layers=1)
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    export_checkpoint(model, ExportConfig(formats=("coreml",), coreml_precision="fp32"), out=tmp_path / "out",
                      tokenizer=tokenizer)
    spec = ct.models.MLModel(str(tmp_path / "out" / "model.mlpackage"), skip_model_load=True).get_spec()
    desc = spec.description
    assert desc.predictedFeatureName == "classLabel" and desc.predictedProbabilitiesName == "classLabel_probs"
    outputs = {o.name: o for o in desc.output}
    assert outputs["classLabel"].type.WhichOneof("Type") == "stringType"
    assert outputs["classLabel_probs"].type.WhichOneof("Type") == "dictionaryType"
    assert list(outputs["logits"].type.multiArrayType.shape) == [1, 4], "raw logits stay available"
    assert coreml_class_labels(spec) == names
    assert desc.metadata.author == "mbconvert" and desc.metadata.versionString == mbconvert.__version__
    assert desc.metadata.shortDescription
    assert all(f.shortDescription for f in list(desc.input) + list(desc.output))
    assert json.loads(desc.metadata.userDefined["id2label"]) == {str(i): n for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------- formats by backend

def test_default_formats_are_those_whose_backend_is_installed(mobilebert_dir, tmp_path, monkeypatch, caplog):
    from mbconvert.cli import main

    assert ExportConfig().formats is None, "no --format: every available format"
    for name in ("coremltools", "executorch", "litert_torch", "onnxruntime_extensions"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "cli"
    with caplog.at_level(logging.INFO, logger="mbconvert"):
        assert main(["export", str(mobilebert_dir), "--seq-len", "16", "-o", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert list(report["artifacts"]) == ["onnx", "onnx-int8"]
    assert report["config"]["formats"] == ["onnx", "onnx-int8"], "export.json records what was exported"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "coreml" in skipped[0] and "mbconvert[export]" in skipped[0]


def test_no_backend_installed_is_a_missing_dependency(mobilebert_dir, tmp_path, monkeypatch, capsys):
    from mbconvert.cli import main

    for name in ("onnx", "onnxruntime", "coremltools", "executorch", "litert_torch"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"mbconvert\[export\]"):
        export_checkpoint(str(mobilebert_dir), ExportConfig(), out=tmp_path / "api")
    assert main(["export", str(mobilebert_dir), "-o", str(tmp_path / "cli")]) == 2
    assert "pip install 'mbconvert[export]'" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() and not (tmp_path / "api").exists()


# ------------------------------------------------------------------------------------- exporters

def deprecations(records) -> list[str]:
    return [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in records
            if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_default_path_is_torch_export_without_deprecation_warnings(tokenizer, tmp_path):
    """ONNX from torch.onnx.export(dynamo=True), Core ML from a torch.export ExportedProgram: no warning that an API
    is deprecated (the legacy exporter and torch.jit.trace raise DeprecationWarning), and export.json says so."""
    pytest.importorskip("onnxscript")  # the dynamo exporter's translator (the export extra); without it: fallback
    model = mobilebert(len(tokenizer), layers=1)
    cfg = ExportConfig(formats=("onnx", "onnx-int8", "coreml"), latency_repeats=1, latency_batch_sizes=(1,),
                       onnx_graph="plain")  # the exporter's graph (the default folded one is written node by node)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        report = export_checkpoint(model, cfg, out=tmp_path / "out", tokenizer=tokenizer)
    assert deprecations(records) == []
    onnx_report, coreml = report["artifacts"]["onnx"], report["artifacts"]["coreml"]
    assert onnx_report["exporter"] == "dynamo" and "exporter_fallback" not in onnx_report
    assert onnx_report["opset"] == 18 and onnx_report["parity"]["passed"] and "warning" not in onnx_report
    assert report["artifacts"]["onnx-int8"]["size_ratio"] < 0.5, "the dynamic INT8 quantiser reads the dynamo graph"
    assert coreml["source"] == "export" and all(i["ranges"] == [[1, 1], [1, 512]] for i in coreml["spec"]["inputs"])
    proto = check_onnx_file(tmp_path / "out" / "model.onnx", model, padded_batch(tokenizer))
    assert len(proto.graph.initializer) and not [i for i in proto.graph.initializer if i.data_location], \
        "one self-contained file"
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    assert "/encoder/layer.0/ffn.0/intermediate/dense/MatMul" in matmuls, "nodes named by module scope"
    assert not any(n.metadata_props for n in proto.graph.node), "no stack traces of this machine in the file"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # what the legacy paths are
def test_legacy_exporters_stay_available_by_name(mobilebert_dir, tokenizer, tmp_path):
    """--onnx-exporter torchscript and --coreml-source trace: the deprecated paths, still with PyTorch's logits."""
    from transformers import AutoModelForSequenceClassification

    from mbconvert.cli import main

    out = tmp_path / "legacy"
    assert main(["export", str(mobilebert_dir), "--format", "onnx,coreml", "--onnx-exporter", "torchscript",
                 "--coreml-source", "trace", "--onnx-graph", "plain", "-o", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    onnx_report, coreml = report["artifacts"]["onnx"], report["artifacts"]["coreml"]
    assert onnx_report["exporter"] == "torchscript" and onnx_report["parity"]["passed"]
    assert report["config"]["onnx_exporter"] == "torchscript" and report["config"]["coreml_source"] == "trace"
    assert coreml["source"] == "trace" and all(i["ranges"] == [[1, 1], [1, 512]] for i in coreml["spec"]["inputs"])
    model = AutoModelForSequenceClassification.from_pretrained(str(mobilebert_dir), attn_implementation="eager")
    check_onnx_file(out / "model.onnx", model.eval(), padded_batch(tokenizer))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the torchscript exporter's own
@pytest.mark.parametrize("failure", ["onnxscript missing", "exporter error"])
def test_dynamo_failure_falls_back_to_torchscript_and_says_so(failure, tokenizer, tmp_path, monkeypatch, caplog):
    import mbconvert.export

    if failure == "onnxscript missing":
        monkeypatch.setitem(sys.modules, "onnxscript", None)
    else:
        def fail(*args, **kwargs):
            raise torch.onnx.errors.OnnxExporterError("Failed to export the model with torch.export (test)")

        monkeypatch.setattr(mbconvert.export, "_export_dynamo", fail)
    model = mobilebert(len(tokenizer), layers=1)
    cfg = ExportConfig(formats=("onnx",), seq_len=16, latency_repeats=1, latency_batch_sizes=(1,), onnx_graph="plain")
    with caplog.at_level(logging.WARNING, logger="mbconvert"):
        report = export_checkpoint(model, cfg, out=tmp_path / "out", tokenizer=tokenizer)
    onnx_report = report["artifacts"]["onnx"]
    assert onnx_report["exporter"] == "torchscript" and onnx_report["parity"]["passed"]
    assert ("onnxscript" if failure == "onnxscript missing" else "(test)") in onnx_report["exporter_fallback"]
    assert "fell back to the torchscript exporter" in onnx_report["warning"]
    assert any("fell back to the torchscript exporter" in r.getMessage() for r in caplog.records)


def test_exporter_options_are_checked():
    assert ExportConfig().onnx_exporter == "dynamo" and ExportConfig().coreml_source == "export"
    assert ExportConfig().opset == 18
    with pytest.raises(ConfigError, match="opset 18 or later"):
        ExportConfig(opset=17)
    assert ExportConfig(opset=17, onnx_exporter="torchscript").opset == 17
    with pytest.raises(ConfigError, match="opset 20 at most"):
        ExportConfig(opset=21, onnx_exporter="torchscript")
    with pytest.raises(ConfigError, match="onnx_exporter must be one of"):
        ExportConfig(onnx_exporter="tflite")
    with pytest.raises(ConfigError, match="coreml_source must be one of"):
        ExportConfig(coreml_source="script")


def test_the_exported_program_holds_at_every_length_the_core_ml_range_admits(tokenizer):
    """torch.export guards MobileBERT's length against 1 and 2 (strides, matmul folding); the graph Core ML converts
    (range 1..512) must still give the model's logits there, its guards off as Core ML has none."""
    from mbconvert.coreml import torch_program
    from mbconvert.export import LogitsWrapper, sample_inputs

    model = mobilebert(len(tokenizer), layers=1)
    wrapper, config = LogitsWrapper(model).eval(), ExportConfig(formats=("coreml",))
    graph = torch_program(wrapper, sample_inputs(model, None, config), config).module(check_guards=False)
    for length in (1, 2, 3, 40):
        ids = torch.randint(1, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(length))
        feeds = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        with torch.no_grad():
            assert torch.allclose(graph(*feeds), wrapper(*feeds), atol=1e-5), length


def test_export_with_4bit_embeddings_writes_a_smaller_int8_file_that_keeps_its_answers(mobilebert_dir, data_file,
                                                                                       tmp_path, capsys):
    """`--embedding-bits 4` (mbconvert.int4): the INT8 file's word-embedding lookup 4-bit, the rest 8-bit."""
    import onnx

    from mbconvert.cli import main

    common = ["export", str(mobilebert_dir), "--format", "onnx-int8", "--data", str(data_file)]
    assert main([*common, "-o", str(tmp_path / "e8")]) == 0
    assert main([*common, "--embedding-bits", "4", "-o", str(tmp_path / "e4")]) == 0
    reports = {b: json.loads((tmp_path / f"e{b}" / "export.json").read_text())["artifacts"]["onnx-int8"]
               for b in (8, 4)}
    assert reports[4]["embedding_bits"] == 4 and reports[8]["embedding_bits"] == 8
    assert reports[4]["size_mb"] < reports[8]["size_mb"]
    assert reports[4]["vs_fp32"]["argmax_agreement"] >= 0.9  # 48 rows: at most 4 answers change
    ops = {n.op_type for n in onnx.load(str(tmp_path / "e4" / "model.int8.onnx")).graph.node}
    assert "GatherBlockQuantized" in ops and "MatMulInteger" in ops  # the rest: 8-bit as before
    capsys.readouterr()
    assert main([*common, "--embedding-bits", "4", "--int8-static", "-o", str(tmp_path / "bad")]) == 2
    assert "--embedding-bits 4" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*common, "--embedding-bits", "2", "-o", str(tmp_path / "bad")]) == 2
    for formats, flag, says in (("onnx", ["--embedding-bits", "4"], "add onnx-int8"),
                                ("coreml", ["--onnx-ort"], "add onnx or onnx-int8")):  # refused, not ignored
        capsys.readouterr()
        assert main(["export", str(mobilebert_dir), "--format", formats, *flag, "-o", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_onnx_ort_saves_the_optimised_graph_in_ort_format_with_the_same_logits(mobilebert_dir, data_file, tmp_path):
    """`--onnx-ort`: model.ort and model.int8.ort, the graphs onnxruntime runs (offline mode, 'extended' level), in
    the ORT format onnxruntime Mobile loads; each gives its ONNX file's logits."""
    from mbconvert.cli import main
    from mbconvert.export import onnx_session

    out = tmp_path / "out"
    assert main(["export", str(mobilebert_dir), "--format", "onnx,onnx-int8", "--data", str(data_file), "--onnx-ort",
                 "-o", str(out)]) == 0
    arts = json.loads((out / "export.json").read_text())["artifacts"]
    for fmt, name in (("onnx", "model.ort"), ("onnx-int8", "model.int8.ort")):
        record = arts[fmt]["ort"]
        assert record["file"] == name and (out / name).read_bytes()[4:8] == b"ORTM"  # the ORT format's identifier
        assert record["vs_onnx"]["max_abs_diff"] <= 1e-6 and record["vs_onnx"]["argmax_agreement"] == 1.0
    feeds = {"input_ids": np.array([[2, 50, 60, 3]]), "attention_mask": np.ones((1, 4), np.int64),
             "token_type_ids": np.zeros((1, 4), np.int64)}
    np.testing.assert_array_equal(onnx_session(out / "model.int8.ort").run(["logits"], feeds)[0],
                                  onnx_session(out / "model.int8.onnx").run(["logits"], feeds)[0])
    assert not (tmp_path / "plain").exists() and main(["export", str(mobilebert_dir), "--format", "onnx",
                                                        "-o", str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "plain").glob("*.ort"))  # only when asked
