"""The path-level pipeline (mbconvert.pipeline): models pass in memory from stage to stage, and that changes no result."""

from __future__ import annotations


import helpers
from mbconvert.cli import main


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


def test_the_output_has_a_model_card_and_no_training_data(small_student, tmp_path, monkeypatch):
    """Pushing the output folder to a hub publishes a card, never the tokenised training set (caches live elsewhere)."""
    d = small_student
    monkeypatch.setenv("MBCONVERT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main([str(a) for a in [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--train",
                                  d / "train.jsonl", "--eval", d / "dev.jsonl", "--steps", "4", "-o", out]]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: transformers" in card and "## Recovery" in card
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if f.startswith("cache") or "tokens" in f or f.endswith(".pt")], files
    assert any(p.name.startswith("tokens-") for p in (tmp_path / "cache").iterdir())  # the cache is used, outside


def test_resume_of_a_conversion_with_other_settings_is_refused(small_student, tmp_path, capsys):
    d = small_student
    base = [d / "student", "--embedding-size", "32", "--calib", d / "train.jsonl", "-o", tmp_path / "out"]
    assert main([str(a) for a in [*base, "--bottleneck", "32"]]) == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert main([str(a) for a in [*base, "--bottleneck", "16", "--resume"]]) == 2
    assert "another source, settings or calibration text" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert main([str(a) for a in [*base, "--bottleneck", "32", "--resume"]]) == 0  # the same run: a no-op
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_data_in_memory_gives_the_same_model_as_the_file(small_student, tmp_path):
    """A training repo holds objects: a list of texts + labels or a 🤗 datasets.Dataset works like the JSONL file."""
    import datasets

    from mbconvert import ConvertConfig, RecoveryConfig, RunOptions, convert_checkpoint

    d = small_student
    rows = helpers.read_jsonl(d / "train.jsonl")
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    cfg, rec = ConvertConfig(bottleneck=32, embedding_size=32), RecoveryConfig(steps=3, batch_size=16)
    run = RunOptions(progress=False, threads=1)
    for name, train in (("file", d / "train.jsonl"), ("lists", (texts, labels)),
                        ("dataset", datasets.Dataset.from_dict({"text": texts, "label": labels}))):
        convert_checkpoint(d / "student", tmp_path / name, cfg, train=train, recovery=rec, run=run)
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in ("file", "lists", "dataset")}
    assert weights["file"] == weights["lists"] == weights["dataset"]


def test_a_corrupt_cache_entry_is_recomputed_not_trusted(tmp_path, caplog):
    import torch

    from mbconvert.cache import cached

    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(4.0)}

    first = cached(tmp_path, "kind", "key", compute)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"\x00garbage")
    again = cached(tmp_path, "kind", "key", compute)
    assert torch.equal(first["x"], again["x"]) and len(calls) == 2
    assert any("unreadable cache entry" in r.getMessage() for r in caplog.records)
    assert torch.equal(cached(tmp_path, "kind", "key", compute)["x"], first["x"]) and len(calls) == 2  # rewritten
