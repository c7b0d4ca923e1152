"""train_classifier: the loop that trains the students (the demo's and examples/train_student.py's)."""

from __future__ import annotations

import pytest
import torch

import helpers
from mbconvert.data import load_encoded
from mbconvert.train import scores, train_classifier


@pytest.fixture(scope="module")
def data(tokenizer, task_data):
    cfg = helpers.bert_config(hidden=64, layers=2, heads=2, intermediate=128)
    return {s: load_encoded(task_data[s], tokenizer, cfg, limit=n) for s, n in (("train", 1200), ("dev", 200))}


def _train(data, seed=0, **kw):
    model = helpers.random_student(seed=seed, hidden=64, layers=2, heads=2, intermediate=128)
    result = train_classifier(model, data["train"], data["dev"], epochs=4.5, lr=3e-3, seed=seed, **kw)
    return model, result


def test_it_learns_and_keeps_the_best_epoch(data):
    model, result = _train(data)
    assert result["steps"] == int(4.5 * 38) and [h["epoch"] for h in result["history"]] == [1, 2, 3, 4, 5]
    best = max(result["history"], key=lambda h: h["dev"]["accuracy"])["dev"]
    assert result["dev"] == best == scores(model, data["dev"], 4)
    assert best["accuracy"] > 0.9  # 4 balanced classes: chance is 0.25


def test_same_seed_same_weights_other_seed_other_weights(data):
    a, _ = _train(data)
    b, _ = _train(data)
    c, _ = _train(data, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_distillation_from_teacher_logits_pulls_towards_the_teacher(data):
    teacher, _ = _train(data)
    with torch.no_grad():
        soft = teacher(**{k: v for k, v in data["train"].batch(torch.arange(len(data["train"]))).items()
                          if k != "labels"}).logits
    student, result = _train(data, seed=2, teacher_logits=soft, alpha=1.0)  # KL only: the labels play no part
    agree = (student(**{k: v for k, v in data["dev"].batch(torch.arange(len(data["dev"]))).items()
                        if k != "labels"}).logits.argmax(-1) == teacher(**{k: v for k, v in data["dev"].batch(
                            torch.arange(len(data["dev"]))).items() if k != "labels"}).logits.argmax(-1))
    assert result["dev"]["accuracy"] > 0.6 and agree.float().mean() > 0.8
