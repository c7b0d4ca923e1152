"""`mbconvert gate` and the pytest plugin: a damaged model fails CI, bad reports are bad input (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import BertForSequenceClassification

from mbconvert.cli import main
from mbconvert.config import GateConfig
from mbconvert.errors import ConfigError, DataError
from mbconvert.gating import gate

CHECK_FAST = ["--repeats", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def reports(trained_student, task_data, tmp_path_factory):
    """A baseline (the source model checked against itself) and a damaged copy's report (classifier bias shifted)."""
    d = tmp_path_factory.mktemp("gate")
    damaged = d / "damaged"
    model = BertForSequenceClassification.from_pretrained(str(trained_student), attn_implementation="eager")
    with torch.no_grad():
        model.classifier.bias[0] += 8.0  # most texts now read as news_a
    model.save_pretrained(str(damaged))
    for f in trained_student.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            (damaged / f.name).write_bytes(f.read_bytes())
    data = str(task_data["test"])
    assert main(["check", str(trained_student), "--against", str(trained_student), "--data", data,
                 "--report", str(d / "baseline"), *CHECK_FAST]) == 0
    assert main(["check", str(damaged), "--against", str(trained_student), "--data", data,
                 "--report", str(d / "damaged_report"), *CHECK_FAST]) == 1
    return {"baseline": d / "baseline" / "report.json", "damaged": d / "damaged_report" / "report.json",
            "damaged_model": damaged}


def test_unchanged_model_passes(reports, capsys):
    assert main(["gate", str(reports["baseline"]), "--baseline", str(reports["baseline"])]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("PASS")


def test_damaged_copy_fails_with_exit_1_and_names_accuracy(reports, capsys):
    rc = main(["gate", str(reports["damaged"]), "--baseline", str(reports["baseline"]), "--tolerance", "0.5"])
    out = capsys.readouterr().out
    assert rc == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("FAIL: accuracy") and "points" in last and "latency" not in last


def _edited(src, tmp_path, name, edit):
    report = json.loads(src.read_text(encoding="utf-8"))
    edit(report)
    path = tmp_path / name
    path.write_text(json.dumps(report), encoding="utf-8")
    return path


def test_latency_and_size_bounds(reports, tmp_path):
    def slower_and_bigger(r):
        for x in r["models"]["converted"]["latency"]:
            x["median_ms"] *= 3
            x["noisy"] = False
        r["models"]["converted"]["size"]["file_bytes"] *= 2

    worse = _edited(reports["baseline"], tmp_path, "worse.json", slower_and_bigger)
    assert gate(worse, reports["baseline"]).passed  # no bounds given: only accuracy is gated
    lat = gate(worse, reports["baseline"], GateConfig(max_latency_ratio=1.5))
    assert not lat.passed and lat.summary().splitlines()[-1].startswith("FAIL: latency (batch 1) ×3.00")
    size = gate(worse, reports["baseline"], GateConfig(max_size_ratio=1.5, max_latency_ratio=4))
    assert not size.passed and size.summary().splitlines()[-1].startswith("FAIL: size ×2.00")
    assert "the current latency" not in size.summary()  # a quiet measurement carries no note

    def noisy(r):
        r["models"]["converted"]["latency"][0]["noisy"] = True

    shaky = _edited(reports["baseline"], tmp_path, "noisy.json", noisy)
    assert "the current latency at batch 1 was noisy" in gate(shaky, reports["baseline"],
                                                               GateConfig(max_latency_ratio=1.5)).summary()


def _worse_by(points):
    def edit(r):
        r["models"]["converted"]["accuracy"] -= points / 100
    return edit


def test_accuracy_tolerance_is_in_points(reports, tmp_path):
    base = reports["baseline"]
    assert gate(_edited(base, tmp_path, "a.json", _worse_by(0.4)), base).passed  # default: a drop ≤ 0.5 points
    worse = _edited(base, tmp_path, "b.json", _worse_by(0.6))
    failed = gate(worse, base)
    assert not failed.passed
    assert failed.summary().splitlines()[-1] == "FAIL: accuracy -0.60 points (drop ≤ 0.50 points)"
    assert gate(worse, base, GateConfig(tolerance=1.0)).passed


@pytest.mark.parametrize("kwargs", [{"tolerance": -0.5}, {"tolerance": 101}, {"tolerance": float("inf")},
                                    {"max_latency_ratio": 0}, {"max_latency_ratio": -1.2},
                                    {"max_size_ratio": float("nan")}])
def test_impossible_gate_options_are_refused(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        GateConfig(**kwargs)


@pytest.mark.parametrize("edit, what", [
    (lambda r: r.update(threads=r["threads"] + 1), "threads"),
    (lambda r: r["machine"].update(processor="another CPU"), "machine"),
])
def test_latency_gate_refuses_reports_from_other_threads_or_machines(reports, tmp_path, capsys, edit, what):
    base = reports["baseline"]
    elsewhere = _edited(base, tmp_path, "elsewhere.json", edit)
    assert gate(elsewhere, base).passed  # accuracy and size still compare
    with pytest.raises(ConfigError, match=what) as e:
        gate(elsewhere, base, GateConfig(max_latency_ratio=1.2))
    assert "\n" not in str(e.value)
    assert main(["gate", str(elsewhere), "--baseline", str(base), "--max-latency-ratio", "1.2"]) == 2
    assert what in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such report"),
    ("not_json", "not valid JSON"),
    ("no_schema", "no schema_version"),
    ("future_schema", "report schema 99"),
    ("incomplete", "incomplete report"),
    ("other_data", "different test data"),
    ("other_tokens", "tokens_sha256 differs: sequence length 16 vs"),
    ("old_schema", "report schema 2 is from an older mbconvert"),
    ("other_source", "different source model"),
    ("empty_latency", "no latency measurements"),
    ("no_batch_size", "latency[0].batch_size"),
    ("string_accuracy", "models.converted.accuracy is '0.9', not a number"),
    ("accuracy_above_one", "models.converted.accuracy"),
])
def test_bad_reports_are_bad_input(reports, tmp_path, capsys, case, message):
    base = reports["baseline"]
    edits = {
        "no_schema": lambda r: r.pop("schema_version"),
        "future_schema": lambda r: r.update(schema_version=99),
        "incomplete": lambda r: r["models"]["converted"].pop("accuracy"),
        "other_data": lambda r: r["inputs"].update(data_sha256="0" * 64),
        "other_tokens": lambda r: r["inputs"].update(tokens_sha256="0" * 64, seq_len=16),  # same file, truncated
        "old_schema": lambda r: r.update(schema_version=2, models={"original": r["models"]["source"],
                                                                  "converted": r["models"]["converted"]}),
        "other_source": lambda r: r["models"]["source"].update(weights_sha256="0" * 64),
        "empty_latency": lambda r: r["models"]["converted"].update(latency=[]),
        "no_batch_size": lambda r: r["models"]["converted"]["latency"][0].pop("batch_size"),
        "string_accuracy": lambda r: r["models"]["converted"].update(accuracy="0.9"),
        "accuracy_above_one": lambda r: r["models"]["converted"].update(accuracy=90.5),
    }
    if case == "missing":
        path = tmp_path / "nope.json"
    elif case == "not_json":
        path = tmp_path / "bad.json"
        path.write_text("{ truncated", encoding="utf-8")
    else:
        path = _edited(base, tmp_path, "r.json", edits[case])
    with pytest.raises(DataError, match=re.escape(message)) as e:
        gate(path, base)
    assert "\n" not in str(e.value)
    assert main(["gate", str(path), "--baseline", str(base)]) == 2
    assert message in capsys.readouterr().err


def test_pytest_plugin_fails_the_run_on_a_drifted_model(reports, trained_student, task_data, tmp_path):
    """A tiny training repo: the marker runs check + gate on the drifted model; the fixture reads a report."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "baseline.json").write_bytes(reports["baseline"].read_bytes())
    (tmp_path / "good_report.json").write_bytes(reports["baseline"].read_bytes())
    (tmp_path / "test_model.py").write_text(textwrap.dedent(f"""
        import pytest

        @pytest.mark.mbconvert_gate(model={str(reports["damaged_model"])!r}, against={str(trained_student)!r},
                                    data={str(task_data["test"])!r}, baseline="baseline.json", tolerance=0.5,
                                    repeats=1, threads=1)
        def test_drifted_model():
            pass

        @pytest.mark.mbconvert_gate(report="good_report.json", baseline="baseline.json")
        def test_unchanged_model():
            pass

        def test_explicit_fixture(mbconvert_gate):
            assert mbconvert_gate(report="good_report.json", baseline="baseline.json").passed
        """), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--strict-markers", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 2 passed" in out
    assert "FAILED test_model.py::test_drifted_model" in out
    assert "FAIL: accuracy" in out
    assert (reports["damaged_model"] / "report" / "report.json").is_file()  # the check's report, for CI artefacts
