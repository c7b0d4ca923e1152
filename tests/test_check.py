"""CompatibilityTestSuite and `mbconvert check`: every number is checked against a value computed here,
independently of mbconvert (plain forward passes, counting by hand)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections import Counter

import pytest
import torch
from transformers import MobileBertConfig, MobileBertForSequenceClassification

import helpers
from mbconvert.check import CompatibilityTestSuite, classification_metrics
from mbconvert.cli import main
from mbconvert.config import CheckConfig
from mbconvert.data import load_encoded
from mbconvert.errors import ShapeMismatchError
from mbconvert.load import load_classifier

FAST = CheckConfig(latency_repeats=2, latency_warmup=1, threads=1)


@pytest.fixture(scope="module")
def student(trained_student):
    model, tok = load_classifier(trained_student)
    return model, tok


@pytest.fixture(scope="module")
def test_rows(task_data):
    return [json.loads(line) for line in task_data["test"].read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def encoded(student, task_data):
    model, tok = student
    return load_encoded(task_data["test"], tok, model.config, require_labels=True)


def random_mobilebert(student_config) -> MobileBertForSequenceClassification:
    torch.manual_seed(0)
    cfg = MobileBertConfig(hidden_size=256, intra_bottleneck_size=64, num_attention_heads=2, num_hidden_layers=4,
                           embedding_size=64, intermediate_size=256, num_feedforward_networks=2,
                           vocab_size=student_config.vocab_size, num_labels=4, id2label=student_config.id2label,
                           label2id=student_config.label2id)
    cfg._attn_implementation = "eager"
    return MobileBertForSequenceClassification(cfg).eval()


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


def test_suite_numbers_match_independent_computation(student, encoded, test_rows):
    model, tok = student
    always_c = copy.deepcopy(model)  # a "converted" model whose predictions are known: always news_c (id 2)
    with torch.no_grad():
        always_c.classifier.weight.zero_()
        always_c.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    enc = tok([r["text"] for r in test_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    gold = [helpers.LABELS.index(r["label"]) for r in test_rows]
    n = len(gold)

    r = CompatibilityTestSuite(model, always_c, encoded, FAST, tokenizer=tok).run().to_dict()

    orig, conv = r["models"]["original"], r["models"]["converted"]
    assert orig["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / n)
    assert orig["accuracy"] >= 0.9  # the trained student is good, so the comparison below is meaningful
    assert [c["f1"] for c in orig["per_class"]] == pytest.approx([_f1_by_hand(pred, gold, k) for k in range(4)])
    assert orig["macro_f1"] == pytest.approx(sum(_f1_by_hand(pred, gold, k) for k in range(4)) / 4)
    assert conv["accuracy"] == pytest.approx(gold.count(2) / n)
    assert conv["per_class"][2]["precision"] == pytest.approx(gold.count(2) / n)
    assert conv["per_class"][2]["recall"] == 1.0
    assert r["accuracy"]["difference"] == pytest.approx(conv["accuracy"] - orig["accuracy"])
    assert r["agreement"] == pytest.approx(pred.count(2) / n)
    expected = Counter((helpers.LABELS[p], "news_c") for p in pred if p != 2)
    got = {(d["original"], d["converted"]): d["count"] for d in r["disagreements"]}
    assert got == dict(expected)
    assert [d["count"] for d in r["disagreements"]] == sorted(got.values(), reverse=True)
    assert not r["passed"] and not r["accuracy"]["within_tolerance"]

    for side in (orig, conv):
        assert [x["batch_size"] for x in side["latency"]] == [1, 32]
        for x in side["latency"]:
            assert x["seq_len"] == encoded.max_length and 0 < x["median_ms"] <= x["p90_ms"]
            assert x["throughput_per_s"] == pytest.approx(x["batch_size"] * 1000 / x["median_ms"])
        assert side["size"]["parameters"] == sum(p.numel() for p in model.parameters())
        assert side["size"]["file_bytes"] > 4 * side["size"]["parameters"]  # float32 + safetensors header
        assert isinstance(side["size"]["forward_peak_rss_bytes"], int)
    assert r["threads"] == 1 and r["inputs"]["rows"] == n and r["inputs"]["labels"] == helpers.LABELS


def test_identical_models_agree_completely(student, encoded):
    model, tok = student
    result = CompatibilityTestSuite(model, copy.deepcopy(model), encoded, FAST).run()
    r = result.to_dict()
    assert r["accuracy"]["difference"] == 0 and r["agreement"] == 1.0 and r["disagreements"] == []
    sim = r["similarity"]
    assert len(sim["layer_cosine"]) == 5 and len(sim["attention_js"]) == 4  # embeddings + 4 layers
    assert sim["layer_cosine"] == pytest.approx([1.0] * 5, abs=1e-5)
    assert max(sim["layer_rel_mse"]) < 1e-8 and max(sim["attention_js"]) < 1e-6
    assert result.passed
    assert result.summary().splitlines()[-1].startswith("PASS")


def test_different_label_sets_are_refused(student, encoded):
    model, _ = student
    three = helpers.random_student(hidden=64, layers=1, heads=2, labels=3)
    with pytest.raises(ShapeMismatchError, match="labels differ"):
        CompatibilityTestSuite(model, three, encoded, FAST)


def test_check_cli_writes_a_rendered_report(student, trained_student, task_data, tmp_path, capsys):
    """A random MobileBERT against the student: exit 1, and a full report folder that renders."""
    model, tok = student
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
    assert r["schema_version"] == 1 and r["passed"] is False
    assert r["inputs"]["data_sha256"] == hashlib.sha256(task_data["test"].read_bytes()).hexdigest()
    assert r["inputs"]["rows"] == 200 and r["inputs"]["converted"] == str(mobile_dir)
    assert {"torch", "transformers", "mbconvert", "python", "platform"} <= set(r["versions"])
    assert r["models"]["converted"]["class"] == "MobileBertForSequenceClassification"
    assert r["models"]["converted"]["size"]["parameters"] < r["models"]["original"]["size"]["parameters"]
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


def test_check_cli_unlabelled_data_is_bad_input(trained_student, tmp_path, capsys):
    data = helpers.write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": r["text"]} for r in helpers.synthetic_rows(5)])
    rc = main(["check", str(trained_student), "--against", str(trained_student), "--data", str(data)])
    assert rc == 2
    assert "missing 'label' column" in capsys.readouterr().err
