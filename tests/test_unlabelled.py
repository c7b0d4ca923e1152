"""Unlabelled text in recovery (issue 19): the source labels it, the distillation reads it, the cross-entropy never."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import MobileBertForSequenceClassification

import helpers
from mbconvert.cli import main
from mbconvert.config import RecoveryConfig
from mbconvert.data import UNLABELLED, Examples, read_texts, with_unlabelled
from mbconvert.errors import DataError
from mbconvert.optim import kd_logits
from mbconvert.transfer import Transfer


def test_unlabelled_rows_are_distilled_but_never_in_the_cross_entropy():
    torch.manual_seed(0)
    student = MobileBertForSequenceClassification(helpers.mobilebert_config()).eval()
    teacher = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    cfg = RecoveryConfig(alpha=0.5, temperature=2.0, mix_rows=0.0)
    transfer = Transfer(student, teacher, cfg, None)
    ids = torch.randint(104, 400, (4, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([2, UNLABELLED, 0, UNLABELLED])}
    targets = torch.randn(4, 4)
    with torch.no_grad():
        logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = transfer.task_loss(batch, targets, step=0)
        kd = kd_logits(logits, targets, cfg.temperature)
        ce = F.cross_entropy(logits[[0, 2]], batch["labels"][[0, 2]])
        torch.testing.assert_close(loss, 0.5 * kd + 0.5 * ce)
        only_unlabelled = {**batch, "labels": torch.full((4,), UNLABELLED)}
        torch.testing.assert_close(transfer.task_loss(only_unlabelled, targets, step=0), kd)


def test_unlabelled_texts_follow_the_training_rows_without_labels(tmp_path):
    (tmp_path / "more.txt").write_text("第一条\n\n第二条\n", encoding="utf-8")
    extra = read_texts(tmp_path / "more.txt")
    assert extra.texts == ["第一条", "第二条"] and extra.labels is None
    joined = with_unlabelled(Examples(["a", "b"], None, [1, 0]), extra)
    assert joined.texts == ["a", "b", "第一条", "第二条"] and joined.labels == [1, 0, UNLABELLED, UNLABELLED]
    with pytest.raises(DataError, match="pairs"):
        with_unlabelled(Examples(["a"], ["x"], [0]), extra)


def test_recovery_with_unlabelled_text_records_its_rows(small_student, tmp_path, capsys):
    d = small_student
    texts = [r["text"] for r in helpers.synthetic_rows(60, seed=9)]
    (tmp_path / "unlabelled.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    common = [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--train", d / "train.jsonl",
              "--unlabelled", tmp_path / "unlabelled.txt", "--steps", "4", "--batch-size", "16", "--threads", "1"]
    assert main([str(a) for a in [*common, "-o", tmp_path / "out"]]) == 0
    recovery = json.loads((tmp_path / "out" / "recovery.json").read_text(encoding="utf-8"))
    assert recovery["training_rows"] == {"labelled": 200, "unlabelled": 60}
    code = main([str(a) for a in [d / "student", "--bottleneck", "32", "--unlabelled", tmp_path / "unlabelled.txt",
                                  "-o", tmp_path / "no-train"]])
    assert code == 2 and "--train" in capsys.readouterr().err and not (tmp_path / "no-train").exists()
