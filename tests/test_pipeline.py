"""The path-level pipeline (mbconvert.pipeline): models pass in memory from stage to stage, and that changes no result."""

from __future__ import annotations

import pytest

import helpers
from mbconvert.cli import main


@pytest.fixture(scope="module")
def small_student(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("pipeline_student")
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    rows = helpers.synthetic_rows(200, seed=5)
    helpers.train_student(model, tokenizer, rows, steps=20)
    model.save_pretrained(str(d / "student"))
    tokenizer.save_pretrained(str(d / "student"))
    helpers.write_jsonl(d / "train.jsonl", rows)
    helpers.write_jsonl(d / "dev.jsonl", helpers.synthetic_rows(40, seed=6))
    return d


def test_convert_and_recover_in_one_run_equals_the_two_commands(small_student, tmp_path):
    """`mbconvert SOURCE --train` recovers the mapped model in memory; `mbconvert SOURCE` then `mbconvert recover`
    reload it from disk. Same bytes: passing models in memory changes nothing."""
    d = small_student
    common = ["--train", d / "train.jsonl", "--eval", d / "dev.jsonl", "--steps", "6", "--no-early-stop",
              "--keep-last", "--batch-size", "16", "--threads", "1"]
    assert main([str(a) for a in [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--calib", d / "train.jsonl",
                                  "--calib-samples", "32", "-o", tmp_path / "one", *common]]) == 0
    assert main([str(a) for a in [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--calib", d / "train.jsonl",
                                  "--calib-samples", "32", "-o", tmp_path / "two"]]) == 0
    assert main([str(a) for a in ["recover", tmp_path / "two", "--source", d / "student", *common]]) == 0
    one, two = (tmp_path / n / "model.safetensors" for n in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
