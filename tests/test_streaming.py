"""Training data larger than memory (issue 19): `--stream` reads and tokenises the training and unlabelled texts through
🤗 datasets into memory-mapped Arrow files in the cache (mbconvert.corpus) and gives recovery the batches the in-memory
path gives, so the result is the same; a corpus several times larger than a memory cap is read without loading it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from mbconvert import corpus
from mbconvert.checkpoint import data_key as encoded_key
from mbconvert.cli import build_parser, main
from mbconvert.config import ConvertConfig, RecoveryConfig, RunOptions
from mbconvert.corpus import Corpus, open_corpus, should_stream
from mbconvert.data import as_examples, encode, label_maps, read_texts, with_unlabelled
from mbconvert.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
LABEL2ID, N_LABELS = label_maps(helpers.bert_config())


def _write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Labels by name and by id, a text that looks like a number, a comma inside a quoted field."""
    rows = helpers.synthetic_rows(150, seed=11)
    rows[3]["label"], rows[7]["text"], rows[9]["text"] = 2, "12345", rows[9]["text"] + ", " + rows[9]["text"]
    return rows


def _sources(kind: str, rows: list[dict], d: Path):
    """(what open_corpus reads, the same data the in-memory path reads) for each kind of input."""
    if kind == "jsonl":
        return (p := helpers.write_jsonl(d / "train.jsonl", rows)), p, None
    if kind == "csv":
        return (p := _write_csv(d / "train.csv", [{**r, "label": str(r["label"])} for r in rows])), p, None
    if kind == "tsv-pairs":
        pairs = [{"text_a": r["text"], "text_b": r["text"][::-1], "label": str(r["label"])} for r in rows]
        return (p := _write_csv(d / "train.tsv", pairs, "\t")), p, None
    if kind == "dataset":
        from datasets import Dataset

        ds = Dataset.from_list([{**r, "label": str(r["label"])} for r in rows])
        return ds, ds, None
    extra = d / "extra.txt"  # jsonl + unlabelled lines, blank and space-only lines among them
    extra.write_text("".join(r["text"] + ("\n\n  \n" if i % 7 == 0 else "\n")
                             for i, r in enumerate(helpers.synthetic_rows(40, seed=12))), encoding="utf-8")
    return (p := helpers.write_jsonl(d / "train.jsonl", rows)), p, extra


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv-pairs", "dataset", "jsonl+unlabelled"])
def test_a_streamed_corpus_gives_the_batches_of_the_in_memory_data(kind, rows, tokenizer, tmp_path):
    """Same rows, lengths, labels, chosen max_length and content key; every batch (ids, mask, token types, labels)
    equal for the same indices, trimmed to the batch's longest row."""
    stream_data, memory_data, extra = _sources(kind, rows, tmp_path)
    examples = as_examples(memory_data, label2id=LABEL2ID, num_labels=N_LABELS)
    if extra is not None:
        examples = with_unlabelled(examples, read_texts(extra))
    want = encode(examples, tokenizer, cap=128)
    got = open_corpus(stream_data, extra, tokenizer, LABEL2ID, N_LABELS, cap=128, cache_dir=tmp_path / "cache")
    assert isinstance(got, Corpus) and len(got) == len(want) and got.max_length == want.max_length
    assert torch.equal(got.lengths, want.lengths) and torch.equal(got.labels, want.labels)
    assert corpus.data_key(got) == encoded_key(want)
    whole = got.head(len(got))
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(getattr(whole, name), getattr(want, name)), name
    g = torch.Generator().manual_seed(0)
    for idx in [torch.randperm(len(want), generator=g)[:17] for _ in range(5)] + [slice(3, 40)]:
        a, b = want.batch(idx), got.batch(idx)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), idx
    order = want.length_order()
    assert torch.equal(got.length_order(), order)
    assert all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(want.batches(32, order=order),
                                                                     got.batches(32, order=order)))
    if extra is not None:
        assert got.rows == {"labelled": len(rows), "unlabelled": 40} and int((got.labels == -1).sum()) == 40


def test_tokenising_in_several_processes_gives_the_same_corpus(rows, tokenizer, tmp_path):
    """map(num_proc=2) writes one Arrow file per process; the corpus reads them back in row order."""
    path = helpers.write_jsonl(tmp_path / "train.jsonl", rows)
    one = open_corpus(path, None, tokenizer, LABEL2ID, N_LABELS, cap=128, cache_dir=tmp_path / "one")
    two = open_corpus(path, None, tokenizer, LABEL2ID, N_LABELS, cap=128, cache_dir=tmp_path / "two", num_proc=2)
    assert len(list(two.folder.glob("*.arrow"))) == 2 and corpus.data_key(two) == corpus.data_key(one)
    assert all(torch.equal(a, b) for a, b in zip(one.batch(slice(60, 90)).values(), two.batch(slice(60, 90)).values()))


@pytest.mark.parametrize("content, message", [
    ('{"text": "一", "label": "news_a"}\n{"text": "", "label": "news_b"}\n', "row 2 has no text in column 'text'"),
    ('{"text": "一", "label": "news_a"}\n{"text": "二", "label": "sports"}\n', "row 2: unknown label 'sports'"),
    ('{"text": "一", "label": 7}\n', "row 1: label 7 but the model has only 4 classes"),
    ('{"sentence": "一", "label": "news_a"}\n{"sentence": "二"}\n', "row 2 has an empty label"),
    ('{"title": "一"}\n', "missing text column"),
    ('{"text": "一"\n', "malformed JSON"),
    ("", "empty")], ids=["no-text", "unknown-label", "label-out-of-range", "empty-label", "no-text-column", "malformed",
                         "empty-file"])
def test_bad_rows_are_one_line_data_errors_like_in_memory(content, message, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(")) as streamed:
        open_corpus(path, None, tokenizer, LABEL2ID, N_LABELS, cache_dir=tmp_path / "cache")
    assert "\n" not in str(streamed.value) and str(streamed.value).startswith(str(path))
    if message != "malformed JSON":  # mbconvert.data says "not a JSON object" there
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            as_examples(path, label2id=LABEL2ID, num_labels=N_LABELS)


def test_streaming_is_chosen_by_the_option_and_the_size_of_the_files(tmp_path):
    path = helpers.write_jsonl(tmp_path / "t.jsonl", helpers.synthetic_rows(50))
    assert not should_stream(RunOptions(), path)  # auto, far below 256 MB
    assert should_stream(RunOptions(stream_threshold_mb=path.stat().st_size / 2e6), path, None)
    assert should_stream(RunOptions(stream="on"), path) and not should_stream(RunOptions(stream="off"), path)
    assert not should_stream(RunOptions(stream="on"), ["texts in memory"])  # already in memory: nothing to stream
    for bad in ({"stream": "yes"}, {"stream_threshold_mb": -1}):
        with pytest.raises(ConfigError):
            RunOptions(**bad)
    a = build_parser("recover").parse_args(["m", "--source", "s", "--train", "t", "--stream", "on",
                                            "--stream-threshold-mb", "64"])
    assert (a.stream, a.stream_threshold_mb) == ("on", 64.0)


# -------------------------------------------------------------------- recovery
def _convert(small_student, out: Path, *flags) -> int:
    d = small_student
    args = [d / "student", "--bottleneck", "32", "--embedding-size", "32", "--train", d / "train.jsonl",
            "--unlabelled", out.parent / "extra.txt", "--eval", d / "dev.jsonl", "--steps", "8", "--batch-size", "16",
            "--eval-every", "2", "--threads", "1", "-o", out, *flags]
    return main([str(a) for a in args])


def test_a_streamed_recovery_ends_with_the_weights_of_the_in_memory_one(small_student, tmp_path):
    """`mbconvert student --train ... --unlabelled ... --stream on` writes the bytes `--stream off` writes (same
    batches, same source logits, same run fingerprint); the tokenised rows and the source's logits are in the cache as
    Arrow and .npy files, never in the output folder."""
    (tmp_path / "extra.txt").write_text("".join(r["text"] + "\n" for r in helpers.synthetic_rows(30, seed=13)),
                                        encoding="utf-8")
    cache = tmp_path / "cache"
    assert _convert(small_student, tmp_path / "off", "--stream", "off", "--cache-dir", cache) == 0
    assert not list(cache.glob("corpus-*"))
    assert _convert(small_student, tmp_path / "on", "--stream", "on", "--cache-dir", cache) == 0
    want, got = load_file(str(tmp_path / "off" / "model.safetensors")), load_file(str(tmp_path / "on" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    summary = {n: json.loads((tmp_path / n / "recovery.json").read_text(encoding="utf-8")) for n in ("off", "on")}
    assert summary["on"]["fingerprint"] == summary["off"]["fingerprint"]
    assert summary["on"]["training_rows"] == summary["off"]["training_rows"] == {"labelled": 200, "unlabelled": 30}
    assert summary["on"]["accuracy_curve"][-1][2] == summary["off"]["accuracy_curve"][-1][2]
    assert len(list(cache.glob("corpus-*/*.arrow"))) == 2 and list(cache.glob("teacher-logits-*.npy"))
    out_files = [p.name for p in (tmp_path / "on").rglob("*")]
    assert not [n for n in out_files if n.endswith((".arrow", ".npy")) or n == "corpus.json"]


def test_a_streamed_pruned_conversion_distils_the_unpruned_source_like_the_in_memory_one(small_student, tmp_path):
    """`--prune-vocab --vocab-from` with `--stream on`: the unpruned source reads its own tokenisation of the corpus
    (a second cached corpus) and the result is the in-memory run's bytes."""
    (tmp_path / "extra.txt").write_text("".join(r["text"] + "\n" for r in helpers.synthetic_rows(30, seed=13)),
                                        encoding="utf-8")
    prune = ["--prune-vocab", "--vocab-from", small_student / "dev.jsonl", "--vocab-size", "200",
             "--cache-dir", tmp_path / "cache"]
    assert _convert(small_student, tmp_path / "off", "--stream", "off", *prune) == 0
    assert _convert(small_student, tmp_path / "on", "--stream", "on", *prune) == 0
    want, got = load_file(str(tmp_path / "off" / "model.safetensors")), load_file(str(tmp_path / "on" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    summary = json.loads((tmp_path / "on" / "recovery.json").read_text(encoding="utf-8"))
    assert "unpruned source" in summary["targets"] and len(list((tmp_path / "cache").glob("corpus-*"))) == 2


def test_the_tokenised_corpus_is_reused_and_the_source_logits_are_memory_mapped(small_student, tmp_path,
                                                                               monkeypatch):
    """A second open of the same files reads the cache: no datasets.load_dataset, no tokenising. The source's logits
    on a corpus are a file-backed CPU tensor equal to the in-memory ones, and a second call reads that file."""
    from mbconvert.load import load_source
    from mbconvert.recovery import teacher_logits

    src = load_source(small_student / "student")
    train, cache = small_student / "train.jsonl", tmp_path / "cache"
    first = open_corpus(train, None, src.tokenizer, *label_maps(src.config), cache_dir=cache)
    assert first.folder.parent == cache and (first.folder / "corpus.json").is_file()

    def never(*_a, **_k):
        raise AssertionError("the cached corpus was tokenised again")

    monkeypatch.setattr(corpus._Source, "open", never)
    monkeypatch.setattr(corpus, "_tokenise", never)
    again = open_corpus(train, None, src.tokenizer, *label_maps(src.config), cache_dir=cache)
    assert again.folder == first.folder and len(again) == len(first) == 200
    want = teacher_logits(src.model, encode(as_examples(train, *label_maps(src.config)), src.tokenizer,
                                            cap=src.config.max_position_embeddings), "cpu", 64, cache)
    got = teacher_logits(src.model, again, "cpu", 64, cache)
    assert torch.equal(got, want) and got.device.type == "cpu"
    files = list(cache.glob("teacher-logits-*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= got.numel() * 4
    monkeypatch.setattr(corpus, "_write_logits", never)
    assert torch.equal(teacher_logits(src.model, again, "cpu", 64, cache), want)


GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available")
def test_two_processes_recover_from_a_streamed_corpus_like_one_from_memory(small_student, tmp_path):
    """`torchrun --nproc_per_node 2 -m mbconvert recover ... --stream on`: both processes open the same cached
    corpus, read their shares of each batch from it and gather the source's logits in blocks; the weights are the
    single in-memory process's to DDP's float tolerance."""
    import shutil

    from mbconvert import pipeline

    d = small_student
    (tmp_path / "extra.txt").write_text("".join(r["text"] + "\n" for r in helpers.synthetic_rows(9, seed=14)),
                                        encoding="utf-8")
    pipeline.convert_checkpoint(d / "student", tmp_path / "mapped", ConvertConfig(bottleneck=32, ffn=1),
                                calib=d / "train.jsonl")
    for name in ("one", "two"):  # without attention dropout: each process draws its own masks
        shutil.copytree(tmp_path / "mapped", tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text(encoding="utf-8"))
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "attention_probs_dropout_prob": 0.0}),
                                                     encoding="utf-8")
    flags = ["--source", d / "student", "--train", d / "train.jsonl", "--unlabelled", tmp_path / "extra.txt", "--eval",
             d / "dev.jsonl", "--steps", "6", "--batch-size", "7", "--no-early-stop", "--keep-last", "--eval-every",
             "3", "--device", "cpu", "--cache-dir", tmp_path / "cache"]
    assert main([str(a) for a in ["recover", tmp_path / "one", *flags, "--stream", "off"]]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mbconvert", *[str(a) for a in ["recover", tmp_path / "two", *flags, "--stream", "on"]]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    want, got = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    start = load_file(str(tmp_path / "mapped" / "model.safetensors"))
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 1e-4  # it did train
    assert json.loads((tmp_path / "two" / "recovery.json").read_text(encoding="utf-8"))["processes"] == 2
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 1 and list((tmp_path / "cache").glob("teacher-*.npy"))


def test_pruning_the_vocabulary_to_streamed_training_texts_is_refused(small_student, tmp_path):
    from mbconvert.pipeline import convert_checkpoint

    with pytest.raises(ConfigError, match="--prune-vocab.*--stream"):
        convert_checkpoint(small_student / "student", tmp_path / "out", ConvertConfig(prune_vocab=True),
                           train=small_student / "train.jsonl", recovery=RecoveryConfig(steps=1),
                           run=RunOptions(stream="on"))
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- memory
MEASURE = r'''
"""Peak memory of reading every batch of a corpus: stream or memory. Prints one JSON line."""
import gc, json, sys, threading, time, tracemalloc

from transformers import AutoTokenizer

from mbconvert.corpus import open_corpus
from mbconvert.data import read_examples

mode, path, warm, tok_dir, cache = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(tok_dir)
labels = {"news_a": 0, "news_b": 1, "news_c": 2, "news_d": 3}


def run(path, cache):
    if mode == "memory":  # mbconvert.data: the rows as Python lists (encoding them would only add to it)
        return len(read_examples(path, labels, 4))
    data = open_corpus(path, None, tok, labels, 4, cache_dir=cache, progress=False)
    return sum(len(b["input_ids"]) for b in data.batches(64))


def anon_kb():  # resident memory that no file backs: the memory-mapped Arrow pages are not in it
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


tracemalloc.start()  # before the warm-up: tracemalloc's own tables count in RssAnon too
run(warm, cache + "-warm")  # the same work on a small file first: imports and allocators' first growth
gc.collect()
tracemalloc.reset_peak()
live = tracemalloc.get_traced_memory()[0]
base, peak, done = anon_kb(), [0], threading.Event()


def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)


threading.Thread(target=poll, daemon=True).start()
started = time.time()
rows = run(path, cache)
done.set()
python_peak = tracemalloc.get_traced_memory()[1] - live  # above what was live before
print(json.dumps({"rows": rows, "python_peak_mb": python_peak / 1e6,
                  "rss_anon_growth_mb": (max(peak[0], anon_kb()) - base) / 1e3, "seconds": time.time() - started}))
'''
ROWS, CAP_MB = 75_000, 8.0  # a 25 MB corpus against an 8 MB cap


def _crawled_rows(n: int) -> list[dict]:
    """The synthetic task's short texts, each with a 240-byte `source` field beside it as crawled corpora have: the
    file is large while tokenising it stays a few seconds on one core."""
    import random
    import string

    rng = random.Random(22)
    return [{**r, "source": "".join(rng.choices(string.ascii_lowercase, k=240))}
            for r in helpers.synthetic_rows(n, seed=21)]


def _measure(mode: str, path: Path, warm: Path, tokenizer_dir: Path, cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path), str(warm), str(tokenizer_dir), str(cache)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc (Linux)")
def test_a_corpus_larger_than_the_memory_cap_streams_without_loading_it_whole(tokenizer_dir, tmp_path):
    """A 25 MB JSONL (75,000 rows) is tokenised and read back batch by batch while the Python allocations
    (tracemalloc) and the resident memory no file backs (RssAnon) each grow by less than an 8 MB cap; the in-memory
    path only reading the same file into Python lists passes the cap many times over."""
    rows = _crawled_rows(ROWS)
    big = helpers.write_jsonl(tmp_path / "big.jsonl", rows)
    warm = helpers.write_jsonl(tmp_path / "warm.jsonl", rows[:5000])
    size_mb = big.stat().st_size / 1e6
    assert size_mb > 2.5 * CAP_MB
    streamed = _measure("stream", big, warm, tokenizer_dir, tmp_path / "cache")
    in_memory = _measure("memory", big, warm, tokenizer_dir, tmp_path / "cache")
    print(f"\n{size_mb:.1f} MB corpus: streamed {streamed}, in memory {in_memory}")
    assert streamed["rows"] == in_memory["rows"] == ROWS
    assert streamed["python_peak_mb"] < CAP_MB and streamed["rss_anon_growth_mb"] < CAP_MB, streamed
    assert in_memory["python_peak_mb"] > 4 * CAP_MB and in_memory["rss_anon_growth_mb"] > 4 * CAP_MB, in_memory
