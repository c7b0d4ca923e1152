"""CompatibilityTestSuite and `mbconvert check`: every number is checked against a value computed here,
independently of mbconvert (plain forward passes, counting by hand)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec
from transformers import MobileBertForSequenceClassification

import helpers
from mbconvert.check import CompatibilityTestSuite, latency_entry, measure_latency
from mbconvert.stats import classification_metrics, mcnemar_exact_p, paired_accuracy, paired_bootstrap_ci
from mbconvert.cli import main
from mbconvert.config import CheckConfig
from mbconvert.data import Encoded, load_encoded
from mbconvert.errors import ConfigError, ShapeMismatchError
from mbconvert.load import load_classifier
from mbconvert.report import render_summary

FAST = CheckConfig(latency_repeats=2, latency_warmup=1, threads=1, latency_min_run_s=0.02)


@pytest.fixture(scope="module")
def source(trained_student):
    model, tok = load_classifier(trained_student)
    return model, tok


@pytest.fixture(scope="module")
def test_rows(task_data):
    return [json.loads(line) for line in task_data["test"].read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def encoded(source, task_data):
    model, tok = source
    return load_encoded(task_data["test"], tok, model.config, require_labels=True)


def random_mobilebert(source_config) -> MobileBertForSequenceClassification:
    torch.manual_seed(0)
    cfg = helpers.mobilebert_config(num_hidden_layers=4, vocab_size=source_config.vocab_size,
                                    id2label=source_config.id2label, label2id=source_config.label2id)
    return MobileBertForSequenceClassification(cfg).eval()


def always_predicts(model, label_id: int):
    """A copy of `model` whose prediction is known: always `label_id`."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.bias.zero_()
        m.classifier.bias[label_id] = 5.0
    return m


def _binomial_two_sided(b: int, c: int) -> float:
    """Exact McNemar by hand: twice the Binomial(b + c, 1/2) tail at min(b, c), in exact fractions."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, float(2 * Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)))


def test_metrics_match_hand_computation():
    gold = [0, 0, 0, 1, 1, 2, 2, 3]
    pred = [0, 0, 1, 1, 1, 2, 0, 2]
    m = classification_metrics(pred, gold, ["a", "b", "c", "d", "never_seen"])
    by = {c["label"]: c for c in m["per_class"]}
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert (by["a"]["precision"], by["a"]["recall"], by["a"]["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (by["b"]["precision"], by["b"]["recall"], by["b"]["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (by["c"]["precision"], by["c"]["recall"], by["c"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (by["d"]["precision"], by["d"]["recall"], by["d"]["f1"], by["d"]["support"]) == (0, 0, 0, 1)
    # a class absent from gold and predictions does not dilute macro-F1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.5 + 0) / 4)


def _f1_by_hand(pred, gold, k):
    tp = sum(p == k and g == k for p, g in zip(pred, gold))
    npred, nsup = sum(p == k for p in pred), sum(g == k for g in gold)
    prec, rec = (tp / npred if npred else 0.0), (tp / nsup if nsup else 0.0)
    return 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def test_suite_numbers_match_independent_computation(source, encoded, test_rows):
    model, tok = source
    always_c = always_predicts(model, 2)  # a "converted" model whose predictions are known: always news_c
    enc = tok([r["text"] for r in test_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    gold = [helpers.LABELS.index(r["label"]) for r in test_rows]
    n = len(gold)

    r = CompatibilityTestSuite(model, always_c, encoded, FAST, tokenizer=tok).run().to_dict()

    src, conv = r["models"]["source"], r["models"]["converted"]
    assert src["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / n)
    assert src["accuracy"] >= 0.9  # the trained source model is good, so the comparison below is meaningful
    assert [c["f1"] for c in src["per_class"]] == pytest.approx([_f1_by_hand(pred, gold, k) for k in range(4)])
    assert src["macro_f1"] == pytest.approx(sum(_f1_by_hand(pred, gold, k) for k in range(4)) / 4)
    assert conv["accuracy"] == pytest.approx(gold.count(2) / n)
    assert conv["per_class"][2]["precision"] == pytest.approx(gold.count(2) / n)
    assert conv["per_class"][2]["recall"] == 1.0
    assert r["accuracy"]["difference_points"] == pytest.approx(100 * (conv["accuracy"] - src["accuracy"]))
    assert r["agreement"] == pytest.approx(pred.count(2) / n)
    expected = Counter((helpers.LABELS[p], "news_c") for p in pred if p != 2)
    got = {(d["source"], d["converted"]): d["count"] for d in r["disagreements"]}
    assert got == dict(expected)
    assert [d["count"] for d in r["disagreements"]] == sorted(got.values(), reverse=True)
    assert not r["passed"] and not r["accuracy"]["within_tolerance"]
    b = sum(p == g != 2 for p, g in zip(pred, gold))  # only the source is right
    c = sum(p != g == 2 for p, g in zip(pred, gold))  # only the converted (always news_c) is right
    acc = r["accuracy"]
    assert acc["discordant"] == {"source_only_correct": b, "converted_only_correct": c}
    assert acc["mcnemar_p"] == pytest.approx(_binomial_two_sided(b, c))
    lo, hi = acc["ci95_points"]
    assert lo <= acc["difference_points"] <= hi
    assert r["models"]["source"]["weights_sha256"] != r["models"]["converted"]["weights_sha256"]

    for side in (src, conv):
        assert [x["batch_size"] for x in side["latency"]] == [1, 32]
        for x in side["latency"]:
            assert x["seq_len"] == encoded.max_length and 0 < x["median_ms"]
            assert x["throughput_per_s"] == pytest.approx(x["batch_size"] * 1000 / x["median_ms"])
            assert x["measurements"] >= 2 and x["iqr_ms"] >= 0 and isinstance(x["noisy"], bool)
        assert side["size"]["parameters"] == sum(p.numel() for p in model.parameters())
        assert side["size"]["file_bytes"] > 4 * side["size"]["parameters"]  # float32 + safetensors header
        assert isinstance(side["size"]["forward_peak_rss_bytes"], int)
    assert r["threads"] == 1 and r["inputs"]["rows"] == n and r["inputs"]["labels"] == helpers.LABELS
    assert {"system", "architecture", "processor", "cpu_count"} <= set(r["machine"])


def test_identical_models_agree_completely(source, encoded, tmp_path):
    model, tok = source
    result = CompatibilityTestSuite(model, copy.deepcopy(model), encoded, FAST).run()
    r = result.to_dict()
    assert r["accuracy"]["difference_points"] == 0 and r["agreement"] == 1.0 and r["disagreements"] == []
    sim = r["similarity"]
    assert len(sim["layer_cosine"]) == 5 and len(sim["attention_js"]) == 4  # embeddings + 4 layers
    assert sim["layer_cosine"] == pytest.approx([1.0] * 5, abs=1e-5)
    assert max(sim["layer_rel_mse"]) < 1e-8 and max(sim["attention_js"]) < 1e-6
    assert result.passed
    assert result.summary().splitlines()[-1].startswith("PASS")
    assert r["accuracy"]["warning"] is None  # 200 texts: 0.5 points each, half the 1-point tolerance
    assert r["accuracy"]["ci95_points"] == [0.0, 0.0] and r["accuracy"]["mcnemar_p"] == 1.0
    assert r["models"]["source"]["weights_sha256"] == r["models"]["converted"]["weights_sha256"]

    quiet = copy.deepcopy(r)  # this machine's load decides what was measured noisy: set the flags by hand
    for side in quiet["models"].values():
        for x in side["latency"]:
            x["noisy"] = False
    quiet["warnings"] = [w for w in quiet["warnings"] if "noisy" not in w]
    noisy = copy.deepcopy(quiet)
    noisy["models"]["converted"]["latency"][0]["noisy"] = True
    assert "noisy" not in render_summary(quiet) and "noisy" in render_summary(noisy)

    out = result.write_report(tmp_path / "rep")  # the Python API writes the report folder without path glue
    assert out == tmp_path / "rep"
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == r
    assert (out / "report.html").is_file() and "95% CI" in (out / "report.md").read_text(encoding="utf-8")


def test_the_report_calls_the_users_model_the_source(source, encoded, tmp_path):
    """Issue 13: report.json, report.md, report.html and the terminal summary name the user's model "source" (the
    result "converted"), never "original"; the suite takes `source=` by keyword as well as by position."""
    model, _ = source
    e = encoded
    small = Encoded(e.input_ids[:40], e.attention_mask[:40], e.token_type_ids[:40], e.labels[:40])
    result = CompatibilityTestSuite(source=model, converted=always_predicts(model, 2), test_data=small,
                                    config=FAST, source_path="model.pt").run()
    r = result.to_dict()
    assert set(r["models"]) == {"source", "converted"} and r["inputs"]["source"] == "model.pt"
    assert r["accuracy"]["source"] == r["models"]["source"]["accuracy"]
    assert set(r["accuracy"]["discordant"]) == {"source_only_correct", "converted_only_correct"}
    assert r["disagreements"] and all(set(d) == {"source", "converted", "count"} for d in r["disagreements"])
    out = result.write_report(tmp_path / "rep")
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (out / "report.html").read_text(encoding="utf-8"))
    texts = {"report.json": (out / "report.json").read_text(encoding="utf-8"), "report.html": page,
             "report.md": (out / "report.md").read_text(encoding="utf-8"), "summary": result.summary()}
    for name, text in texts.items():
        assert "source" in text and not re.search(r"\borig", text, re.I), name
    assert "vs source" in result.summary().splitlines()[-1]


def test_different_label_sets_are_refused(source, encoded):
    model, _ = source
    three = helpers.random_student(hidden=64, layers=1, heads=2, labels=3)
    with pytest.raises(ShapeMismatchError, match="labels differ"):
        CompatibilityTestSuite(model, three, encoded, FAST)


def test_check_cli_writes_a_rendered_report(source, trained_student, task_data, tmp_path, capsys):
    """A random MobileBERT against the source: exit 1, and a full report folder that renders."""
    model, tok = source
    mobile_dir = tmp_path / "mobile"
    random_mobilebert(model.config).save_pretrained(str(mobile_dir))
    tok.save_pretrained(str(mobile_dir))
    report_dir = tmp_path / "report"
    rc = main(["check", str(mobile_dir), "--against", str(trained_student), "--data", str(task_data["test"]),
               "--repeats", "2", "--threads", "1", "--report", str(report_dir)])
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"^FAIL: accuracy difference", out, re.M)

    r = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert r["schema_version"] == 3 and r["passed"] is False
    assert r["inputs"]["data_sha256"] == hashlib.sha256(task_data["test"].read_bytes()).hexdigest()
    assert r["inputs"]["rows"] == 200 and r["inputs"]["converted"] == str(mobile_dir)
    assert r["inputs"]["source"] == str(trained_student)
    assert {"torch", "transformers", "mbconvert", "python", "platform"} <= set(r["versions"])
    assert r["models"]["converted"]["class"] == "MobileBertForSequenceClassification"
    assert r["models"]["converted"]["size"]["parameters"] < r["models"]["source"]["size"]["parameters"]
    assert len(r["similarity"]["layer_cosine"]) == 5  # same inter-block width (256): hidden states compared

    pngs = sorted(report_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["overview.png", "per_class_f1.png", "similarity.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000 for p in pngs)
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) == 3
    assert all(base64.b64decode(e).startswith(b"\x89PNG") and len(e) > 1000 for e in embedded)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "| accuracy |" in md and "![similarity](similarity.png)" in md
    assert "McNemar" in md and "95% CI" in md and "IQR" in md


def test_check_cli_unlabelled_data_is_bad_input(trained_student, tmp_path, capsys):
    data = helpers.write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": r["text"]} for r in helpers.synthetic_rows(5)])
    rc = main(["check", str(trained_student), "--against", str(trained_student), "--data", str(data)])
    assert rc == 2
    assert "missing 'label' column" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- accuracy criterion

def test_a_better_converted_model_passes_unless_two_sided(source, encoded):
    """Only a drop beyond the tolerance fails; `two_sided=True` opts into the |Δ| test."""
    model, _ = source
    worse = always_predicts(model, 2)
    better = CompatibilityTestSuite(worse, model, encoded, FAST).run()
    r = better.to_dict()
    assert r["accuracy"]["difference_points"] > 50 and r["two_sided"] is False
    assert better.passed and r["accuracy"]["within_tolerance"]
    assert better.summary().splitlines()[-1].startswith("PASS: accuracy difference +")
    two = CompatibilityTestSuite(worse, model, encoded, replace(FAST, two_sided=True)).run()
    assert not two.passed and two.summary().splitlines()[-1].startswith("FAIL")
    assert not CompatibilityTestSuite(model, worse, encoded, FAST).run().passed


def _correct(n: int, source_only: int, converted_only: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-text correctness of two models: both right except on the given numbers of discordant texts."""
    src, conv = np.ones(n, bool), np.ones(n, bool)
    conv[:source_only] = False
    src[source_only:source_only + converted_only] = False
    return src, conv


@pytest.mark.parametrize("source_only, converted_only, two_sided, within", [
    (10, 0, False, True),  # a drop of exactly the tolerance (1 point of 1000 texts) is allowed
    (11, 0, False, False),  # 1.1 points worse
    (0, 50, False, True),  # 5 points better: fine one-sided
    (0, 50, True, False),  # ... but not when asking for |Δ| ≤ tolerance
    (0, 10, True, True),
])
def test_accuracy_criterion_in_points(source_only, converted_only, two_sided, within):
    src, conv = _correct(1000, source_only, converted_only)
    acc = paired_accuracy(src, conv, tolerance=1.0, two_sided=two_sided)
    assert acc["difference_points"] == pytest.approx((converted_only - source_only) / 10)
    assert acc["within_tolerance"] is within


@pytest.mark.parametrize("b, c", [(0, 0), (1, 9), (9, 1), (5, 5), (0, 7), (400, 500)])
def test_mcnemar_exact_p_is_the_binomial_tail(b, c):
    assert mcnemar_exact_p(b, c) == pytest.approx(_binomial_two_sided(b, c), rel=1e-9)


def test_mcnemar_known_value():
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)


def test_paired_bootstrap_ci_is_deterministic_and_matches_the_normal_approximation():
    src, conv = _correct(1000, 30, 60)  # Δ = +3 points
    lo, hi = paired_bootstrap_ci(src, conv)
    assert (lo, hi) == paired_bootstrap_ci(src, conv)  # seeded: identical on every run
    d = conv.astype(float) - src.astype(float)
    half = 1.96 * 100 * d.std() / math.sqrt(len(d))
    assert lo == pytest.approx(3.0 - half, abs=0.15) and hi == pytest.approx(3.0 + half, abs=0.15)
    assert paired_bootstrap_ci(src, src) == (0.0, 0.0)  # no discordant texts: Δ is certain


def test_wide_interval_warns_without_changing_the_verdict():
    src, conv = _correct(1000, 30, 60)  # CI half-width ≈ 1.85 points > 1 point
    acc = paired_accuracy(src, conv, tolerance=1.0, two_sided=False)
    assert acc["within_tolerance"] and "confidence interval" in acc["warning"]
    assert paired_accuracy(src, conv, tolerance=5.0, two_sided=False)["warning"] is None


def test_a_test_set_too_small_for_the_tolerance_is_flagged(source, encoded):
    model, _ = source
    e = encoded
    small = Encoded(e.input_ids[:90], e.attention_mask[:90], e.token_type_ids[:90], e.labels[:90])
    result = CompatibilityTestSuite(model, copy.deepcopy(model), small, FAST).run()
    r = result.to_dict()
    assert result.passed and r["accuracy"]["points_per_text"] == pytest.approx(100 / 90)
    assert "1.11 points per text" in r["accuracy"]["warning"] and r["accuracy"]["warning"] in r["warnings"]
    assert any(line.startswith("WARNING") and "1.11 points per text" in line for line in result.summary().splitlines())


# ----------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("field, value", [
    ("tolerance", -0.1), ("tolerance", 100.5), ("tolerance", float("nan")), ("tolerance", "1"),
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("max_length", 0),
    ("latency_batch_sizes", ()), ("latency_batch_sizes", (1, 0)), ("latency_repeats", 0), ("latency_warmup", 0),
    ("latency_min_run_s", 0.0), ("similarity_samples", -1), ("threads", 0),
])
def test_impossible_check_options_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        CheckConfig(**{field: value})


def test_check_tolerance_is_in_points():
    assert CheckConfig().tolerance == 1.0 and not CheckConfig().two_sided
    assert CheckConfig(tolerance=0).tolerance == 0 and CheckConfig(tolerance=100, threads=1).threads == 1


# ----------------------------------------------------------------------------------------------- latency

def test_latency_statistics_come_from_the_benchmark_measurement():
    times = [0.010, 0.011, 0.012, 0.013, 0.030, 0.031, 0.032, 0.033]  # bimodal: a noisy run
    spec = TaskSpec(stmt="model(**inputs)", setup="pass", num_threads=1)
    e = latency_entry(Measurement(number_per_run=1, raw_times=times, task_spec=spec), batch_size=4, seq_len=16,
                      warmup=3)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    assert e["median_ms"] == pytest.approx(1000 * median) and e["iqr_ms"] == pytest.approx(1000 * (q3 - q1))
    assert e["measurements"] == 8 and e["noisy"] is True
    assert e["throughput_per_s"] == pytest.approx(4 / median)
    steady = latency_entry(Measurement(1, [0.0100, 0.0101, 0.0099, 0.0100], spec), batch_size=1, seq_len=16,
                           warmup=3)
    assert steady["noisy"] is False


def test_latency_takes_at_least_the_requested_measurements(source, encoded):
    model, _ = source
    e = measure_latency(model, encoded, batch_size=1, seq_len=16, warmup=1, repeats=7, threads=1, min_run_s=0.01)
    assert e["measurements"] >= 7 and e["warmup"] == 1 and e["median_ms"] > 0 and e["seq_len"] == 16


# ----------------------------------------------------------------------------------------------- attention

def test_sdpa_models_still_get_their_attention_compared(source, encoded):
    model, _ = source
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m in (a, b):
        m.set_attn_implementation("sdpa")
    r = CompatibilityTestSuite(a, b, encoded, FAST).run().to_dict()
    assert len(r["similarity"]["attention_js"]) == 4 and max(r["similarity"]["attention_js"]) < 1e-6
    assert a.config._attn_implementation == "sdpa" == b.config._attn_implementation  # left as they came
