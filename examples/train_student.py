"""Train the BERT-family classifier ("student") that mbconvert converts. Deterministic, cached, CPU-friendly.

    python examples/train_student.py --data ../shared/data/toutiao --out checkpoints/toutiao-student
    python examples/train_student.py --data ../shared/data/agnews --init <pretrained HF BERT folder> \\
        --out checkpoints/agnews-minilm --epochs 3 --lr 5e-5

Default: a 4-layer, hidden-512, 8-head, intermediate-2048 BERT with the Chinese character vocabulary (the shape
of uer/chinese_roberta_L-4_H-512) trained FROM SCRATCH: no model hub is reachable here. Real users start from
their own pretrained weights with --init (architecture and tokenizer then come from that folder; a bare BertModel
gets a fresh classification head). --teacher adds knowledge distillation, alpha·T²·KL(T) + (1-alpha)·CE.
Writes OUT.pt (plain state dict, tokenizer files beside it), OUT/ (save_pretrained) and OUT/train_summary.json.
Re-running the same command reuses the output (pass --force to retrain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification)

from mbconvert.data import read_rows, choose_max_length, encode, label_names_for, read_examples
from mbconvert.errors import MbconvertError
from mbconvert.fileio import atomic_dir, atomic_torch_save, write_json
from mbconvert.load import load_classifier, load_tokenizer
from mbconvert.similarity import predict_logits
from mbconvert.train import scores, train_classifier

HERE = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = HERE.parent / "shared" / "data" / "bert-base-chinese-tokenizer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with train/dev/test.jsonl (+ labels.json)")
    p.add_argument("--train"), p.add_argument("--dev"), p.add_argument("--test")
    p.add_argument("--labels", help="labels.json (names by id); default: beside the data, else from the train rows")
    p.add_argument("--out", required=True, help="writes OUT.pt, OUT/ (HF folder) and OUT/train_summary.json")
    p.add_argument("--init", help="pretrained HF BERT folder to fine-tune (default: train from scratch)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer folder when training from scratch")
    p.add_argument("--layers", type=int, default=4), p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8), p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--arch", choices=("bert", "distilbert"), default="bert",
                   help="the student's architecture when training from scratch (distilbert: no token types, "
                        "a ReLU pre-classifier head)")
    p.add_argument("--teacher", help="checkpoint to distil from (any format mbconvert loads)")
    p.add_argument("--alpha", type=float, default=0.5), p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=None, help="default 5e-4 from scratch (1e-3 diverged here), 5e-5 with --init")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="default: the data's 99th percentile")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--bf16", action="store_true",
                   help="train with bfloat16 autocast (~1.7x faster on CPUs with AVX512-BF16/AMX); weights and eval stay fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="token/teacher cache (default: OUT's folder/.cache)")
    p.add_argument("--force", action="store_true", help="retrain even if OUT matches this command")
    a = p.parse_args(argv)
    if a.data:
        d = Path(a.data)
        a.train, a.dev, a.test = (a.train or d / "train.jsonl", a.dev or d / "dev.jsonl", a.test or d / "test.jsonl")
    if not a.train:
        p.error("give --data DIR or --train FILE")
    a.dev, a.test = [x if x and Path(x).is_file() else None for x in (a.dev, a.test)]
    a.lr = a.lr if a.lr is not None else (5e-5 if a.init else 5e-4)
    return a


def digest(path) -> str | None:
    """Content hash of a file, or of every file directly in a folder (so moved or relative paths still match)."""
    if not path or not Path(path).exists():
        return None
    p, h = Path(path), hashlib.sha256()
    for f in sorted(p.iterdir()) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(a) -> dict:
    """What decides the result: the options and the content of every input (not where the files are)."""
    paths = ("data", "train", "dev", "test", "labels", "init", "tokenizer", "teacher", "out", "cache_dir", "force")
    keep = {k: v for k, v in vars(a).items() if k not in paths}
    keep.update({k: digest(getattr(a, k)) for k in paths[1:8]})
    if a.init:  # the architecture and tokenizer come from --init
        keep.update(tokenizer=None, layers=None, hidden=None, heads=None, intermediate=None)
    if keep.get("arch") == "bert":  # the default: BERT students' fingerprints stay what they were
        keep.pop("arch")
    return keep


def label_names(a) -> list[str]:
    if a.labels:
        return json.loads(Path(a.labels).read_text(encoding="utf-8"))
    names = label_names_for(a.train)  # labels.json beside the data
    if names is None:  # no labels.json: the label values found in the rows
        values = {str(r["label"]) for r in read_rows(Path(a.train)) if r.get("label") not in (None, "")}
        names = sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    return names


def build_model(a, names):
    id2label, label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    torch.manual_seed(a.seed)
    if a.init:
        tok = load_tokenizer(a.init)
        model = BertForSequenceClassification.from_pretrained(
            a.init, num_labels=len(names), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
    else:
        tok = load_tokenizer(a.tokenizer)
        labels = dict(num_labels=len(names), id2label=id2label, label2id=label2id)
        if a.arch == "distilbert":
            cfg = DistilBertConfig(vocab_size=len(tok), dim=a.hidden, n_layers=a.layers, n_heads=a.heads,
                                   hidden_dim=a.intermediate, max_position_embeddings=512, **labels)
            return DistilBertForSequenceClassification(cfg), tok
        cfg = BertConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, intermediate_size=a.intermediate, max_position_embeddings=512,
                         **labels)
        model = BertForSequenceClassification(cfg)
    return model, tok


def teacher_logits(a, names, examples, cache: Path) -> torch.Tensor:
    """The teacher's logits on the training rows, columns in our label order; computed once and cached."""
    fp = fingerprint(a)
    key = hashlib.sha256(json.dumps([fp["train"], fp["teacher"], names]).encode())
    file = cache / f"teacher-{key.hexdigest()[:16]}.pt"
    if file.is_file():
        return torch.load(file, weights_only=True)
    teacher, ttok = load_classifier(a.teacher)
    tnames = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    if len(tnames) != len(names):
        raise SystemExit(f"the teacher has {len(tnames)} classes, the data {len(names)}")
    cols = [tnames.index(n) for n in names] if set(tnames) == set(names) else list(range(len(names)))
    print(f"teacher logits for {len(examples)} rows (cached in {file})", flush=True)
    logits = predict_logits(teacher, encode(examples, ttok, cache_dir=cache))[:, cols]
    cache.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(logits, file)
    return logits


def main(argv=None) -> int:
    a = parse_args(argv)
    out, pt = Path(a.out), Path(a.out).with_suffix(".pt")
    fp = fingerprint(a)
    summary_file = out / "train_summary.json"
    if not a.force and pt.is_file() and summary_file.is_file():
        old = json.loads(summary_file.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            print(f"{out}: up to date (dev {old['dev']}, test {old['test']}); --force retrains")
            return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mbconvert").setLevel(logging.INFO)  # the per-epoch dev lines
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    cache = Path(a.cache_dir) if a.cache_dir else out.parent / ".cache"

    names = label_names(a)
    label2id = {n: i for i, n in enumerate(names)}
    model, tok = build_model(a, names)
    rows = {s: read_examples(f, label2id=label2id, num_labels=len(names), require_labels=True)
            for s, f in (("train", a.train), ("dev", a.dev), ("test", a.test)) if f}
    max_len = a.max_length or choose_max_length(rows["train"], tok)
    enc = {s: encode(ex, tok, max_length=max_len, cache_dir=cache) for s, ex in rows.items()}
    soft = teacher_logits(a, names, rows["train"], cache) if a.teacher else None
    train = enc["train"]

    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, {len(names)} classes, {len(train)} train rows, length {max_len}, "
          f"{a.epochs} epochs of {-(-len(train) // a.batch_size)} steps, lr {a.lr}, {threads} threads", flush=True)
    result = train_classifier(model, train, enc.get("dev"), epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                              warmup=a.warmup, weight_decay=a.weight_decay, seed=a.seed, teacher_logits=soft,
                              alpha=a.alpha, temperature=a.temperature, bf16=a.bf16, desc="student")
    best, step, history = result["dev"], result["steps"], result["history"]
    test = scores(model, enc["test"], len(names)) if "test" in enc else None
    wall = result["seconds"]
    summary = {"dev": best, "test": test, "steps": step, "wall_time_s": round(wall, 1), "history": history,
               "max_length": max_len, "parameters": params, "threads": threads, "labels": names,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "fingerprint": fp}

    tok = load_tokenizer(a.init or a.tokenizer)  # a fresh copy: encoding left padding/truncation state in ours
    with atomic_dir(out) as tmp:  # the HF folder appears whole or not at all
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "train_summary.json", summary)
    atomic_torch_save(model.state_dict(), pt)
    try:  # the seed's format: a state dict with tokenizer (+ labels.json) beside it, unless another one is there
        other = load_tokenizer(pt.parent).get_vocab() != tok.get_vocab()
    except MbconvertError:
        other = False
    if other:
        print(f"note: {pt.parent} holds another tokenizer; load {pt} with --tokenizer {out}", file=sys.stderr)
    else:
        tok.save_pretrained(pt.parent)
        write_json(pt.parent / "labels.json", names)  # class names for the state dict (mbconvert.load reads it)
    print(f"test {test}  (best dev {best})\nwrote {pt} and {out}/ in {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MbconvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
