"""Training data larger than memory: read and tokenised through 🤗 `datasets` into memory-mapped Arrow files.

`Encoded` (mbconvert.data) holds every row as a padded tensor, and reading a file first makes a Python list of its
rows: fine for a few hundred thousand texts, not for ten million. `open_corpus` reads the same JSONL/CSV/TSV/TXT
files (or a `datasets.Dataset`) with `datasets.load_dataset`, tokenises them with `Dataset.map(batched=True,
num_proc=...)` into variable-length id columns plus a length column, and keeps the result in the cache
(mbconvert.cache: never the output folder, whose files may be published), keyed by the files' bytes (a Dataset's
fingerprint), the tokenizer and the length, so a second run reads it back without tokenising. `Corpus` answers what
recovery asks of `Encoded` (len, batch(idx) padded to the batch's longest row, lengths, labels, length_order,
batches) and gives the same batches, row for row, bit for bit. The source's logits on a corpus are written batch by
batch to a memory-mapped .npy file in the cache (`Corpus.logits`), never gathered into one tensor.

The column conventions and errors are mbconvert.data's: text/text_a/sentence (+ text_b/sentence2), `label` as a
class name or id; rows of `--unlabelled` carry UNLABELLED. A run streams when `RunOptions.stream` says on, or under
auto when the files together exceed `stream_threshold_mb` (`should_stream`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from .cache import cache_root, content_key
from .data import PAIR_KEYS, TEXT_KEYS, UNLABELLED, Encoded, Examples, _label_id, choose_max_length
from .errors import ConfigError, DataError, MissingDependencyError, TokenizerError

log = logging.getLogger("mbconvert")
VERSION = 1  # of the cached layout: a change makes new cache entries
READ_CHUNK = 1 << 18  # bytes that datasets' JSON and text readers hold at once
LOGIT_CHUNK = 1 << 16  # rows per gathered share of the source's logits under several processes
ROWS_PER_PROC = 100_000  # map(num_proc=...) starts one more process per this many rows
SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


# -------------------------------------------------------------------- when to stream
def is_streamable(data) -> bool:
    return isinstance(data, (str, os.PathLike)) or _is_dataset(data)


def _is_dataset(data) -> bool:
    return type(data).__name__ == "Dataset" and hasattr(data, "_fingerprint") and hasattr(data, "map")


def _size(data) -> int:
    if _is_dataset(data):
        return int(data.data.nbytes)
    p = Path(data)
    return p.stat().st_size if p.is_file() else 0


def should_stream(run, *data) -> bool:
    """Whether recovery reads `data` (training data, unlabelled texts; None ignored) through a Corpus: `run.stream`
    on, or auto and together larger than `run.stream_threshold_mb`. Texts already in memory (lists, Examples) never
    stream."""
    data = [d for d in data if d is not None]
    if run.stream == "off" or not data:
        return False
    if not all(is_streamable(d) for d in data):
        if run.stream == "on":
            log.info("--stream on: texts given in memory (not a file or a datasets.Dataset) are read as they are")
        return False
    if run.stream == "auto" and sum(_size(d) for d in data) <= run.stream_threshold_mb * 1e6:
        return False
    if importlib.util.find_spec("datasets") is None:
        if run.stream == "on":
            raise MissingDependencyError("--stream on reads the data through 🤗 datasets: "
                                         "pip install 'mbconvert[stream]'")
        log.warning("warning: the training data is larger than --stream-threshold-mb but 🤗 datasets is not "
                    "installed: reading it into memory (pip install 'mbconvert[stream]' to stream it)")
        return False
    return True


@contextlib.contextmanager
def _progress(show: bool):
    import datasets

    hidden = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not hidden:
            datasets.enable_progress_bars()


# -------------------------------------------------------------------- reading
class _Source:
    """One input (a file or a Dataset): its content hash at once; its raw Arrow rows and their text, pair and label
    columns when `open()`ed (a corpus already in the cache never is)."""

    def __init__(self, data, cache: Path, texts_only: bool, label2id=None, num_labels=None):
        self.data, self.cache, self.texts_only, self.lines = data, cache, texts_only, False
        self.label2id, self.num_labels, self.raw = label2id, num_labels, None
        if _is_dataset(data):
            self.name, self.hash, self.kind = "<dataset>", data._fingerprint, "dataset"
            return
        self.name = str(data)
        self.hash, self.kind = _file_hash(Path(data))
        if self.kind == "tsv" and Path(data).suffix.lower() == ".txt" and texts_only:
            with open(data, encoding="utf-8", errors="replace") as f:  # mbconvert.data.read_texts' test
                self.lines = not set(f.readline().rstrip("\r\n").split("\t")) & set(TEXT_KEYS)

    def open(self) -> "_Source":
        import datasets

        try:
            self.raw = self.data if self.kind == "dataset" else self._load(Path(self.data), self.kind, self.cache)
        except (datasets.exceptions.DatasetsError, ValueError) as e:
            cause = e.__cause__ or e
            raise DataError(f"{self.name}: malformed {self.kind.upper()} ({str(cause).splitlines()[0][:200]})"
                            ) from None
        if len(self.raw) == 0:
            raise DataError(f"{self.name}: the data file has no rows")
        cols = self.raw.column_names
        self.text_key = next((k for k in TEXT_KEYS if k in cols), None)
        if self.text_key is None:
            raise DataError(f"{self.name}: missing text column (expected one of {', '.join(TEXT_KEYS)}; found "
                            f"{', '.join(cols)})")
        self.pair_key = next((k for k in PAIR_KEYS if k in cols), None)
        self.labelled = "label" in cols and not self.texts_only
        return self

    def spec(self) -> dict:
        """What tokenising a row needs (picklable for map's worker processes)."""
        return {"name": self.name, "text_key": self.text_key, "pair_key": self.pair_key, "label2id": self.label2id,
                "num_labels": self.num_labels}

    def _load(self, path: Path, kind: str, cache: Path):
        from datasets import Features, Value, load_dataset

        # datasets keys its own Arrow copy by path and modification time: under the content hash, a file rewritten
        # with another content and the same mtime (cp -p, rsync -t) is never read back from a stale copy
        common = dict(data_files=str(path), cache_dir=str(cache / "datasets" / self.hash[:32]), split="train")
        if self.lines:  # one text per line, blank lines skipped
            raw = load_dataset("text", chunksize=READ_CHUNK, **common)
            return raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        if kind == "json":
            return load_dataset("json", chunksize=READ_CHUNK, **common)
        with open(path, encoding="utf-8", newline="") as f:  # the header names the columns; every field is a string
            header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), None)
        if not header:
            raise DataError(f"{path}: no header row")
        return load_dataset("csv", sep="\t" if kind == "tsv" else ",", keep_default_na=False, na_filter=False,
                            features=Features({c: Value("string") for c in header}), **common)

    def rows(self, idx: list[int]) -> list[dict]:
        return self.raw.select(idx).to_list() if idx else []

    def __len__(self) -> int:
        return len(self.raw)


def _file_hash(path: Path) -> tuple[str, str]:
    """The sha256 of a data file's bytes (read in 1 MiB blocks) and its format; mbconvert.data's errors."""
    kind = SUFFIXES.get(path.suffix.lower())
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file (.jsonl, .csv or .tsv)")
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix.lower()!r} (use .jsonl, .csv or .tsv)")
    h, blank = hashlib.sha256(), True
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            blank = blank and not block.strip()
    if blank:
        raise DataError(f"{path}: the data file is empty")
    return h.hexdigest(), kind


def _encode_rows(batch: dict, indices: list[int], spec: dict, tokenizer, max_length: int, labels: str) -> dict:
    """One batch of raw rows → token ids, types, lengths (and labels): the checks of mbconvert.data, row by row."""
    name, text_key = spec["name"], spec["text_key"]
    texts, ids = batch[text_key], []
    for j, (text, i) in enumerate(zip(texts, indices)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}: row {i + 1} has no text in column {text_key!r}")
        if labels == "file":
            ids.append(_label_id(batch["label"][j], spec["label2id"], spec["num_labels"], name, i + 1))
    pairs = [str(p or "") for p in batch[spec["pair_key"]]] if spec["pair_key"] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=True,
                    return_attention_mask=False)
    out = {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
           "length": [len(x) for x in enc["input_ids"]]}
    if labels != "none":
        out["labels"] = ids if labels == "file" else [UNLABELLED] * len(texts)
    return out


def _sample(sources: list[_Source], n: int, seed: int = 0) -> Examples:
    """`Examples.subset(n, seed)` of the sources' rows joined (all rows, in order, when there are at most n)."""
    total = sum(len(s) for s in sources)
    idx = list(range(total)) if n >= total else torch.randperm(total, generator=torch.Generator().manual_seed(seed))[
        :n].tolist()
    texts, pairs, labels, start, picked = [], [], [], 0, {}
    for s in sources:
        mine = [i - start for i in idx if start <= i < start + len(s)]
        picked.update({start + j: (s, j, row) for j, row in zip(mine, s.rows(mine))})
        start += len(s)
    for i in idx:
        s, j, row = picked[i]
        text = row.get(s.text_key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{s.name}: row {j + 1} has no text in column {s.text_key!r}")
        texts.append(text)
        pairs.append(str(row.get(s.pair_key) or "") if s.pair_key else None)
        labels.append(_label_id(row.get("label"), s.label2id, s.num_labels, s.name, j + 1) if s.labelled
                      else UNLABELLED)
    return Examples(texts, pairs if sources[0].pair_key else None, labels if sources[0].labelled else None)


def sample_examples(data, label2id=None, num_labels=None, n: int = 512, seed: int = 0, cache_dir=None) -> Examples:
    """A seeded sample of `n` rows of a data file or Dataset without reading it whole (calibration texts); every
    row, in file order, when it has at most n."""
    return _sample([_Source(data, cache_root(cache_dir), False, label2id, num_labels).open()], n, seed)


# -------------------------------------------------------------------- tokenising
def open_corpus(train, unlabelled, tokenizer, label2id=None, num_labels=None, *, max_length: int | None = None,
                cap: int = 512, cache_dir=None, num_proc: int | None = None, progress: bool = True) -> "Corpus":
    """The rows of `train` followed by those of `unlabelled` (label UNLABELLED; None: none), tokenised like
    mbconvert.data.encode (the same ids, the same chosen max_length) into the cache, or read back from it."""
    if tokenizer is None:
        raise TokenizerError("a tokenizer is needed to read text data; pass --tokenizer DIR")
    if max_length is not None and max_length > cap:
        raise ConfigError(f"max length {max_length} exceeds the model's {cap} position embeddings")
    root = cache_root(cache_dir)
    with _progress(progress):
        sources = [_Source(train, root, False, label2id, num_labels)]
        if unlabelled is not None:
            sources.append(_Source(unlabelled, root, True))
        vocab = sorted(tokenizer.get_vocab().items())
        key = content_key(VERSION, [(s.hash, s.lines, s.kind) for s in sources], label2id, num_labels, max_length,
                          cap, vocab,
                          type(tokenizer).__name__, getattr(tokenizer, "do_lower_case", None))
        folder = root / f"corpus-{key}"
        if not (folder / "corpus.json").is_file():
            sources = [s.open() for s in sources]
            if len(sources) == 2 and bool(sources[0].pair_key) != bool(sources[1].pair_key):
                raise DataError("the unlabelled texts and the training data must both be single texts or both pairs")
            if max_length is None:
                max_length = choose_max_length(_sample(sources, 2000), tokenizer, cap=cap)
            _tokenise(sources, tokenizer, max_length, folder, key, num_proc)
        else:
            log.info("reading the tokenised training data from the cache (%s)", folder)
    return Corpus.load(folder)


def _tokenise(sources: list[_Source], tokenizer, max_length: int, folder: Path, key: str, num_proc) -> None:
    from datasets import Features, List, Value

    work = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    labelled = sources[0].labelled
    features = {"input_ids": List(Value("int32")), "token_type_ids": List(Value("int8")), "length": Value("int32")}
    files, rows = [], {"labelled": 0, "unlabelled": 0}
    try:
        for i, s in enumerate(sources):
            mode = "none" if not labelled else ("file" if i == 0 else "unlabelled")
            procs = min(len(s), num_proc or max(1, min(os.cpu_count() or 1, len(s) // ROWS_PER_PROC)))
            log.info("tokenising %d rows of %s (max length %d, %d process%s)", len(s), s.name, max_length, procs,
                     "es" if procs > 1 else "")
            name = f"part{i}.arrow"
            s.raw.map(_encode_rows, batched=True, with_indices=True, remove_columns=s.raw.column_names,
                      fn_kwargs={"spec": s.spec(), "tokenizer": tokenizer, "max_length": max_length, "labels": mode},
                      features=Features({**features, **({"labels": Value("int64")} if labelled else {})}),
                      cache_file_name=str(work / name), new_fingerprint=f"{key}-{i}",
                      num_proc=procs if procs > 1 else None, desc=f"tokenising {Path(s.name).name}")
            files += [name] if procs == 1 else [f"part{i}_{r:05d}_of_{procs:05d}.arrow" for r in range(procs)]
            rows["labelled" if i == 0 and labelled else "unlabelled"] += len(s)
        meta = {"version": VERSION, "max_length": max_length, "files": files, "rows": rows,
                "pad": [tokenizer.pad_token_id or 0, getattr(tokenizer, "pad_token_type_id", 0) or 0]}
        (work / "corpus.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.replace(work, folder)
        except OSError:  # another process wrote the same entry first
            if not (folder / "corpus.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------- the corpus
class Corpus:
    """Tokenised rows in memory-mapped Arrow files, read a batch at a time: `Encoded`'s interface for recovery."""

    def __init__(self, table, max_length: int, pad: tuple[int, int], key: str, rows: dict,
                 folder: Path | None = None):
        self.table, self.max_length, self.pad, self.key, self.rows = table, max_length, tuple(pad), key, rows
        self.folder = folder
        self._arrow = table.with_format("arrow")
        self._lengths = self._labels = None
        self.has_labels = "labels" in table.column_names

    @classmethod
    def load(cls, folder: Path) -> "Corpus":
        from datasets import Dataset, concatenate_datasets

        meta = json.loads((folder / "corpus.json").read_text(encoding="utf-8"))
        parts = [Dataset.from_file(str(folder / f)) for f in meta["files"]]
        table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        return cls(table, meta["max_length"], meta["pad"], folder.name.removeprefix("corpus-"), meta["rows"], folder)

    def __len__(self) -> int:
        return len(self.table)

    def _column(self, name: str) -> np.ndarray:
        return self.table.with_format("arrow", columns=[name])[:].column(name).to_numpy()

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per row (what Encoded's attention_mask sums to), for length bucketing and length order."""
        if self._lengths is None:
            self._lengths = torch.from_numpy(self._column("length").astype(np.int64))
        return self._lengths

    @property
    def labels(self) -> torch.Tensor | None:
        if self.has_labels and self._labels is None:
            self._labels = torch.from_numpy(self._column("labels").astype(np.int64))
        return self._labels

    def _rows(self, idx, width: int | None = None) -> dict[str, torch.Tensor]:
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        idx = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        t = self._arrow[idx]
        lengths = t.column("length").to_numpy().astype(np.int64)
        width = width or max(int(lengths.max()), 1)
        real = np.arange(width)[None, :] < lengths[:, None]
        out = {"input_ids": _pad(t.column("input_ids"), real, self.pad[0]),
               "attention_mask": torch.from_numpy(real.astype(np.int64)),
               "token_type_ids": _pad(t.column("token_type_ids"), real, self.pad[1])}
        if self.has_labels:
            out["labels"] = torch.from_numpy(t.column("labels").to_numpy().astype(np.int64))
        return out

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """The rows at `idx` (indices or a slice), padded to their longest row: Encoded.batch's tensors."""
        return self._rows(idx)

    length_order = Encoded.length_order
    batches = Encoded.batches

    def head(self, n: int) -> Encoded:
        """The first n rows as an in-memory Encoded, padded to max_length (a sample for reports)."""
        d = self._rows(range(min(n, len(self))), self.max_length)
        return Encoded(d["input_ids"], d["attention_mask"], d["token_type_ids"], d.get("labels"))

    def shard(self, rows: slice) -> "Corpus":
        """A contiguous range of rows (no copy): one process's share under several processes."""
        start, stop, _ = rows.indices(len(self))
        return Corpus(self.table.select(range(start, stop)), self.max_length, self.pad, f"{self.key}[{start}:{stop}]",
                      self.rows)

    def data_key(self) -> str:
        """mbconvert.checkpoint.data_key of the same rows as an Encoded (hashed a block at a time, kept beside the
        corpus): a run's fingerprint does not depend on whether its data streamed."""
        stored = self.folder / "data_key.txt" if self.folder is not None else None
        if stored is not None and stored.is_file():
            return stored.read_text(encoding="utf-8").strip()
        h, n, block = hashlib.sha256(), len(self), max(1, (8 << 20) // (8 * self.max_length))
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            h.update(f"{torch.int64}{(n, self.max_length)}".encode())
            for start in range(0, n, block):
                h.update(self._rows(range(start, min(n, start + block)), self.max_length)[name].numpy().tobytes())
        if self.has_labels:
            h.update(f"{torch.int64}{(n,)}".encode())
            h.update(self.labels.numpy().tobytes())
        key = h.hexdigest()[:20]
        if stored is not None:
            from .fileio import atomic_write_text

            with contextlib.suppress(OSError):
                atomic_write_text(stored, key)
        return key

    def logits(self, model, device, batch_size: int, path: Path, group, desc: str = "") -> torch.Tensor:
        """`model`'s float32 logits on every row, in row order, as a CPU tensor over a memory-mapped .npy file at
        `path` (computed once: a later run with the same key reads it). One process computes them in
        Encoded's length order, so they equal predict_logits' bit for bit; several compute shares of blocks of rows
        and gather them (every process keeps its own copy of the same file)."""
        arr = _open_logits(path, len(self))
        if group.max(float(arr is None))[0]:
            was_training = model.training
            model.eval()
            _write_logits(self, model, device, batch_size, path, group, desc)
            model.train(was_training)
            arr = _open_logits(path, len(self))
        return torch.from_numpy(arr)


def _pad(column, real: np.ndarray, pad: int) -> torch.Tensor:
    """A list column → an int64 (rows, width) array of its values left-aligned over `pad`."""
    values = column.combine_chunks().flatten().to_numpy()
    out = np.full(real.shape, pad, dtype=np.int64)
    out[real] = values
    return torch.from_numpy(out)


def _open_logits(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="c")  # copy-on-write: a writable view, the file never changes
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == rows and arr.dtype == np.float32 else None


@torch.no_grad()
def _write_logits(corpus: Corpus, model, device, batch_size: int, path: Path, group, desc: str) -> None:
    from tqdm.auto import tqdm

    from .similarity import inputs_for, predict_logits

    n, out = len(corpus), None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")

    def put(rows: np.ndarray, logits: torch.Tensor):
        nonlocal out
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, logits.shape[1]))
        out[rows] = logits.cpu().numpy()

    try:
        if group.size == 1:  # predict_logits' batches: shortest rows first
            order = corpus.length_order()
            steps = range(0, n, batch_size)
            for start in tqdm(steps, desc=desc, unit="batch", leave=False, disable=not desc):
                rows = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in corpus.batch(rows).items()}
                put(rows.numpy(), model(**inputs_for(model, batch), output_hidden_states=False,
                                        output_attentions=False).logits.float())
        else:
            for start in range(0, n, LOGIT_CHUNK):
                stop = min(n, start + LOGIT_CHUNK)
                put(np.arange(start, stop), group.map_rows(corpus.shard(slice(start, stop)),
                                                           lambda part: predict_logits(model, part, batch_size,
                                                                                       device)))
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def data_key(data) -> str | None:
    """mbconvert.checkpoint.data_key for an Encoded or a Corpus (the same key for the same rows)."""
    from .checkpoint import data_key as encoded_key

    return data.data_key() if isinstance(data, Corpus) else encoded_key(data)
