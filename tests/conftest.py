"""Shared fixtures. Session-scoped so the trained student is built once per test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """mbconvert's cache (tokenised data, source logits) goes to a temporary folder, never the user's ~/.cache."""
    import os

    previous = os.environ.get("MBCONVERT_CACHE")
    os.environ["MBCONVERT_CACHE"] = str(tmp_path_factory.mktemp("mbconvert-cache"))
    yield
    if previous is None:
        os.environ.pop("MBCONVERT_CACHE", None)
    else:
        os.environ["MBCONVERT_CACHE"] = previous


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    helpers.make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic 4-class keyword task: train/dev/test JSONL files (labels by name)."""
    d = tmp_path_factory.mktemp("task")
    return {"train": helpers.write_jsonl(d / "train.jsonl", helpers.synthetic_rows(1200, seed=1)),
            "dev": helpers.write_jsonl(d / "dev.jsonl", helpers.synthetic_rows(200, seed=2)),
            "test": helpers.write_jsonl(d / "test.jsonl", helpers.synthetic_rows(200, seed=3))}


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory, tokenizer, tokenizer_dir, task_data) -> Path:
    """A small BERT (4 layers, hidden 256, 4 heads) trained on the synthetic task, saved as an HF folder
    with its tokenizer. Accuracy on test is high (≥0.9), so agreement and accuracy are meaningful."""
    import json

    rows = [json.loads(line) for line in task_data["train"].read_text(encoding="utf-8").splitlines()]
    model = helpers.random_student(hidden=256, layers=4, heads=4, intermediate=1024)
    helpers.train_student(model, tokenizer, rows, steps=250)
    d = tmp_path_factory.mktemp("student")
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def small_student(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT (hidden 64, 2 layers, 2 heads) trained 20 steps, as an HF folder `student/` with its tokenizer,
    beside train.jsonl (200 rows) and dev.jsonl (40 rows): the fastest source a whole pipeline run can take."""
    d = tmp_path_factory.mktemp("small_student")
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    rows = helpers.synthetic_rows(200, seed=5)
    helpers.train_student(model, tokenizer, rows, steps=20)
    model.save_pretrained(str(d / "student"))
    tokenizer.save_pretrained(str(d / "student"))
    helpers.write_jsonl(d / "train.jsonl", rows)
    helpers.write_jsonl(d / "dev.jsonl", helpers.synthetic_rows(40, seed=6))
    return d
