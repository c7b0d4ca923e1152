"""Vocabulary pruning benchmark (issue 18): one student converted twice, without and with --prune-vocab.

    python benchmarks/vocab.py --suite toutiao       # checkpoints/toutiao-student/, ../shared/data/toutiao
    python benchmarks/vocab.py --suite agnews        # checkpoints/agnews-minilm/, ../shared/data/agnews

Both conversions go through mbconvert's public pipeline (mbconvert.pipeline.convert_checkpoint, then
export_checkpoint with formats onnx and onnx-int8) with the same mapping settings and the same recovery: the suite's
recovery settings from benchmarks/run.py (AG News: bf16, token mixing, final weights), `--steps` optimiser steps,
no early stop, evaluated on the dev split (which also picks the kept weights where the suite keeps the best
ones). The pruned vocabulary keeps the special tokens and every token of the suite's training texts (all rows of
train.jsonl, min count 1, no size cap), as `mbconvert --prune-vocab` does by default; `--vocab-size K --vocab-fill`
fills the room left up to K as `mbconvert --vocab-fill` does (mbconvert.vocab.fill_tokens). Per variant it reports the
vocabulary size, parameters, FP32 and INT8 ONNX file sizes, the [UNK] coverage on the test texts
(mbconvert.vocab.coverage: tokens and texts that become [UNK] and did not before), test accuracy of the ONNX FP32 and
INT8 files (the export's own check on every test row), and pruned − unpruned in points, with a paired bootstrap
interval and McNemar p over the test texts (PyTorch FP32 predictions, mbconvert.stats).

Step-counted, never a time budget: with the same seed and thread count a busy machine gives the same numbers, only
later. Default `--steps 600`: about 5 minutes per recovery on the 2-core box for Toutiao (the MobileBERT at
bottleneck 128 trains ~2 steps/s at batch 32 there). The student's logits on the training rows are computed once:
the pruned conversion distils the unpruned student reading its own tokens (mbconvert.recovery's logits_from), the
same cached logits, and uses the pruned student only for its layer-wise stages and mixed rows; its dev accuracy
(in brackets in the recovery line) is the pruned student's on the pruned tokens. `--train-rows` limits the rows the
recovery distils on (the first N of the shuffled split, like run.py's quick mode), not the vocabulary's texts.

Writes benchmarks/results/vocab-<suite>.{json,md} and replaces (or appends) the section between
`<!-- vocab:<suite> -->` and `<!-- /vocab:<suite> -->` in benchmarks/RESULTS.md (`--results FILE`: another file,
with the per-suite files in results/ beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from mbconvert.errors import CorruptFileError, DataError, MbconvertError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  benchmarks/run.py: the suites (students, data, recovery settings)
from sections import section_bounds, write_section  # noqa: E402

# the issue's targets (issue 18): INT8 MobileBERT size with --prune-vocab, accuracy vs the unpruned MobileBERT
INT8_TARGET_MB = {"toutiao": 4.0, "agnews": 5.0}
ACCURACY_TOLERANCE_PT = 0.1
VOCAB_TARGET = 16_384
VARIANTS = {"unpruned": False, "pruned": True}
LABELS = {"unpruned": "unpruned", "pruned": "`--prune-vocab`"}
MACHINE_KEYS = ("platform", "cpu_count")  # in mbconvert.environment.versions(); shown with the machine


# ----------------------------------------------------------------------------------------------- measuring
def convert_variant(name: str, prune: bool, student: Path, data: Path, train, recovery, args, work: Path) -> dict:
    """Convert + recover (one folder under `work`), export ONNX FP32/INT8 measured on every test row; returns the
    conversion, recovery and export reports."""
    from mbconvert.config import ConvertConfig, ExportConfig, RunOptions
    from mbconvert.pipeline import convert_checkpoint, export_checkpoint

    out = work / name
    print(f"--- {name}: convert and recover ({args.steps} steps) → {out}", flush=True)
    t0 = time.time()
    conversion = convert_checkpoint(str(student), out, ConvertConfig(bottleneck=args.bottleneck, prune_vocab=prune,
                                                                     seed=args.seed, ffn=args.ffn,
                                                                     vocab_size=args.vocab_size if prune else None,
                                                                     vocab_fill=args.vocab_fill and prune,
                                                                     vocab_min_count=args.vocab_min_count if prune else 1),
                                    train=train, eval_data=data / "dev.jsonl", recovery=recovery,
                                    run=RunOptions(threads=args.threads, cache_dir=str(work / "cache")),
                                    vocab_from=data / "train.jsonl" if prune else None)
    convert_s = time.time() - t0
    exported = export_checkpoint(str(out), ExportConfig(formats=("onnx", "onnx-int8"), max_samples=args.test_rows,
                                                        threads=args.threads, latency_batch_sizes=(),
                                                        embedding_bits=args.embedding_bits),
                                 data=data / "test.jsonl")
    return {"out": out, "conversion": conversion, "export": exported, "convert_s": convert_s}


def measure(name: str, run_: dict, test, original_tokenizer) -> tuple[dict, torch.Tensor]:
    """The variant's row (vocabulary, parameters, file sizes, coverage, accuracies) and its per-text correctness
    (PyTorch FP32) on the test texts."""
    from mbconvert.data import encode
    from mbconvert.load import load_classifier
    from mbconvert.similarity import predict_logits
    from mbconvert.vocab import coverage

    model, tok = load_classifier(run_["out"])
    enc = encode(test, tok, cap=model.config.max_position_embeddings)  # as export_checkpoint encodes --data
    correct = predict_logits(model, enc).argmax(-1) == enc.labels
    art, rec = run_["export"]["artifacts"], run_["conversion"]["recovery"]
    row = {"vocab_size": model.config.vocab_size, "parameters": run_["export"]["model"]["parameters"],
           "onnx_fp32_mb": art["onnx"]["size_mb"], "onnx_int8_mb": art["onnx-int8"]["size_mb"],
           "coverage": coverage(original_tokenizer, tok, test),
           "accuracy_fp32": art["onnx"]["accuracy"], "accuracy_int8": art["onnx-int8"]["accuracy"],
           "accuracy_pytorch": float(correct.float().mean()),
           "int8_agreement_fp32": art["onnx-int8"]["vs_fp32"]["argmax_agreement"],
           "onnx_parity": art["onnx"]["parity"], "test_rows": run_["export"]["inputs"]["rows"],
           "seq_len": run_["export"]["inputs"]["seq_len"], "export_warnings": run_["export"]["warnings"],
           "recovery": {k: rec.get(k) for k in ("steps", "wall_s", "final_accuracy", "source_accuracy", "targets")},
           "convert_and_recover_s": run_["convert_s"], "folder": str(run_["out"])}
    if "vocabulary" in run_["conversion"]:
        row["vocabulary"] = run_["conversion"]["vocabulary"]  # conversion.json: sizes, savings, dev coverage
    print(f"--- {name}: vocabulary {row['vocab_size']:,}, INT8 {row['onnx_int8_mb']:.2f} MB, test FP32 "
          f"{row['accuracy_fp32']:.4f} INT8 {row['accuracy_int8']:.4f}", flush=True)
    return row, correct


def student_cost(student: Path, pruned_dir: str, test) -> dict:
    """What the pruning costs the student itself: the unpruned student on its own tokens vs the student pruned to the
    conversion's vocabulary (mbconvert.vocab: exact on texts whose tokens were all kept) on the pruned tokens, PyTorch
    FP32 on the test texts. The MobileBERT's difference includes this, which comes before any conversion."""
    from transformers import AutoTokenizer

    from mbconvert.data import encode
    from mbconvert.load import load_classifier
    from mbconvert.similarity import predict_logits
    from mbconvert.vocab import prune_to_tokenizer

    model, tok = load_classifier(student)
    pruned_tok = AutoTokenizer.from_pretrained(pruned_dir)
    correct = {}
    for name, (m, t) in {"unpruned": (model, tok), "pruned": (prune_to_tokenizer(model, tok, pruned_tok),
                                                              pruned_tok)}.items():
        enc = encode(test, t, cap=m.config.max_position_embeddings)
        correct[name] = predict_logits(m, enc).argmax(-1) == enc.labels
    a, b = correct["unpruned"], correct["pruned"]
    return {"accuracy_unpruned": float(a.float().mean()), "accuracy_pruned": float(b.float().mean()),
            "points": 100 * float(b.float().mean() - a.float().mean()), "texts_lost": int((a & ~b).sum()),
            "texts_gained": int((~a & b).sum())}


def compare(rows: dict, correct: dict) -> dict:
    """Pruned − unpruned: test accuracy in points (ONNX FP32, INT8) and the paired statistics of PyTorch FP32."""
    from mbconvert.stats import paired_accuracy

    a, b = rows["unpruned"], rows["pruned"]
    paired = paired_accuracy(correct["unpruned"].tolist(), correct["pruned"].tolist(), ACCURACY_TOLERANCE_PT,
                             two_sided=False)
    return {"fp32_points": 100 * (b["accuracy_fp32"] - a["accuracy_fp32"]),
            "int8_points": 100 * (b["accuracy_int8"] - a["accuracy_int8"]),
            "agreement_fp32": float((correct["unpruned"] == correct["pruned"]).float().mean()),
            "paired_pytorch_fp32": paired}


def targets(suite: str, rows: dict, diff: dict, embedding_bits: int = 8) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (from the numbers above)."""
    a, b = rows["unpruned"], rows["pruned"]
    tol, size_target = ACCURACY_TOLERANCE_PT, INT8_TARGET_MB[suite]
    return [
        {"target": f"INT8 MobileBERT ≤ {size_target:g} MB with `--prune-vocab`",
         "measured": f"{b['onnx_int8_mb']:.2f} MB (unpruned {a['onnx_int8_mb']:.2f} MB"
                     + ("; word embeddings 4-bit in both" if embedding_bits == 4 else "") + ")",
         "met": b["onnx_int8_mb"] <= size_target},
        {"target": f"test accuracy within {tol:g} pt of the unpruned MobileBERT, FP32 (one-sided: a gain passes)",
         "measured": f"{diff['fp32_points']:+.2f} pt ({b['accuracy_fp32']:.4f} vs {a['accuracy_fp32']:.4f})",
         "met": diff["fp32_points"] >= -tol - 1e-9},
        {"target": f"test accuracy within {tol:g} pt of the unpruned MobileBERT, INT8 (one-sided)",
         "measured": f"{diff['int8_points']:+.2f} pt ({b['accuracy_int8']:.4f} vs {a['accuracy_int8']:.4f})",
         "met": diff["int8_points"] >= -tol - 1e-9},
        {"target": f"vocabulary ≤ {VOCAB_TARGET:,} entries",
         "measured": f"{b['vocab_size']:,} (unpruned {a['vocab_size']:,})", "met": b["vocab_size"] <= VOCAB_TARGET},
    ]


def run(args) -> dict:
    from mbconvert.data import label_maps, read_examples
    from mbconvert.environment import versions
    from mbconvert.load import load_classifier

    spec = bench.SUITES[args.suite]
    student, data = args.student or spec["student"], args.data or spec["data"]
    if not (data / "train.jsonl").is_file():
        raise DataError(f"{data}/train.jsonl not found: the benchmark needs ../shared/data (see its README)")
    if not (student / "config.json").is_file():
        raise CorruptFileError(f"{student}/config.json missing: build the student as checkpoints/README.md says")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"bench-vocab-{args.suite}-"))
    work.mkdir(parents=True, exist_ok=True)
    source, tokenizer = load_classifier(student)
    label2id, n = label_maps(source.config)
    test = read_examples(data / "test.jsonl", label2id=label2id, num_labels=n, require_labels=True)
    args.test_rows = len(test)
    train = read_examples(data / "train.jsonl", label2id=label2id, num_labels=n, require_labels=True,
                          limit=args.train_rows)
    del source
    # run.py's recovery settings for the suite, with a step count instead of its time budget
    recovery = bench.recovery_config(None, args.seed, {**spec.get("recovery", {}), "steps": args.steps})

    rows, correct = {}, {}
    for name, prune in VARIANTS.items():
        done = convert_variant(name, prune, student, data, train, recovery, args, work)
        rows[name], correct[name] = measure(name, done, test, tokenizer)
    diff = compare(rows, correct)
    cost = student_cost(student, rows["pruned"]["folder"], test)
    return {"suite": args.suite, "date": str(date.today()),
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "threads": args.threads},
            "versions": versions("onnx", "onnxruntime"),
            "settings": {"student": str(student), "data": str(data), "steps": args.steps, "seed": args.seed,
                         "bottleneck": args.bottleneck, "ffn": args.ffn, "vocab_size_cap": args.vocab_size,
                         "vocab_fill": args.vocab_fill,
                         "train_rows": len(train), "test_rows": len(test),
                         "vocab_from": "train.jsonl, all rows", "vocab_min_count": args.vocab_min_count,
                         "embedding_bits": args.embedding_bits,
                         "recovery_config": recovery.to_dict(), "work": str(work)},
            "variants": rows, "pruned_vs_unpruned": diff, "student_pruning": cost,
            "targets": targets(args.suite, rows, diff, args.embedding_bits)}


# ----------------------------------------------------------------------------------------------- writing
def render(results: dict, command: str) -> str:
    """The Markdown section: table, settings, paired comparison and the targets."""
    s, rows, d = results["settings"], results["variants"], results["pruned_vs_unpruned"]
    m, v = results["machine"], results["versions"]
    f = bench._f
    lines = [f"## Vocabulary pruning (issue 18) — {bench.SUITES[results['suite']]['title']}", "",
             f"Command: `{command}` · date {results['date']} · {m['processor']} ({v['platform']}), "
             f"{m['cpu_count']} CPUs, {m['threads']} threads · wall time {results['wall_s'] / 60:.1f} min · "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None and k not in MACHINE_KEYS), "",
             "| MobileBERT | vocabulary | parameters | ONNX FP32 MB | ONNX INT8 MB | test tokens → new [UNK] | "
             "test texts with a new [UNK] | test acc FP32 | test acc INT8 | Δ FP32 vs unpruned | "
             "Δ INT8 vs unpruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c = r["coverage"]
        delta = (("", "") if name == "unpruned" else
                 (f"{d['fp32_points']:+.2f} pt", f"{d['int8_points']:+.2f} pt"))
        lines.append("| " + " | ".join([
            LABELS[name], f"{r['vocab_size']:,}", f"{r['parameters'] / 1e6:.2f}M", f(r["onnx_fp32_mb"], 2),
            f(r["onnx_int8_mb"], 2), f"{100 * c['new_unk_token_share']:.3f}% ({c['new_unk_tokens']:,} of "
            f"{c['tokens']:,})", f"{100 * c['texts_with_new_unk_share']:.2f}%", f(r["accuracy_fp32"]),
            f(r["accuracy_int8"]), *delta]) + " |")
    rc, p, pr = s["recovery_config"], d["paired_pytorch_fp32"], rows["pruned"]
    lo, hi = p["ci95_points"]
    lines += ["", f"Both from `{_shown(s['student'])}`, bottleneck {s['bottleneck']}, "
              f"{s.get('ffn', 4)} stacked FFNs per layer, seed {s['seed']}; the same "
              f"recovery: {rc['steps']} steps (layer-wise share {rc['layerwise_share']:g}, batch {rc['batch_size']}, "
              f"task LR {rc['lr']:g}, bf16 {'on' if rc['bf16'] else 'off'}, token-mixed rows {rc['mix_rows']:g}, keep "
              f"{rc['keep']}, no early stop) on {s['train_rows']:,} training rows"
              + (", model selection on the dev split. " if rc["keep"] == "best" else ". ")
              + (f"The pruned vocabulary keeps the special tokens and every token of the "
                 f"{pr['vocabulary']['texts']:,} training texts ({s['vocab_from']}, min count {s['vocab_min_count']}), "
                 f"then fills the room up to {s['vocab_size_cap']:,} tokens with the {pr['vocabulary']['filled']:,} "
                 "dropped words whose re-split reading changes the student's prediction on the word most "
                 "(`--vocab-fill`, mbconvert.vocab.fill_tokens). "
                 if s.get("vocab_fill") else
                 f"The pruned vocabulary keeps at most {s['vocab_size_cap']:,} tokens, special tokens included and then "
                 f"the most frequent tokens "
                 f"of the {pr['vocabulary']['texts']:,} training texts ({s['vocab_from']}, min count "
                 f"{s['vocab_min_count']}). "
                 if s.get("vocab_size_cap") else
                 f"The pruned vocabulary keeps the special tokens and every token of the "
                 f"{pr['vocabulary']['texts']:,} training texts ({s['vocab_from']}, min count {s['vocab_min_count']}). ")
              + f"Test: {s['test_rows']:,} rows, sequence length "
              f"{rows['unpruned']['seq_len']} (unpruned) / {pr['seq_len']} (pruned); accuracies are the exported "
              "ONNX files' (onnxruntime, INT8 dynamic per-channel"
              + (", the word-embedding table 4-bit in both INT8 files (`--embedding-bits 4`, mbconvert.int4)"
                 if s.get("embedding_bits") == 4 else "") + "); [UNK] coverage: test tokens inside a word that "
              "the pruned tokenizer reads as [UNK] and the original did not "
              f"({100 * pr['coverage']['texts_changed_share']:.2f}% of the test texts are tokenised differently "
              "at all).",
              f"Pruned vs unpruned, paired over the {s['test_rows']:,} test texts (PyTorch FP32): "
              f"{p['difference_points']:+.2f} pt, 95% CI {lo:+.2f} to {hi:+.2f} pt, McNemar p {p['mcnemar_p']:.2g}, "
              f"same right/wrong on {100 * d['agreement_fp32']:.1f}% of the texts"
              + (f"; {p['warning']}" if p["warning"] else "") + ".",
              *_student_text(results.get("student_pruning")),
              "Recovery, dev accuracy of the kept weights (the student's in brackets, for the pruned conversion the "
              "pruned student's; its targets: " + (pr["recovery"].get("targets") or "the pruned student's logits")
              + "): " + ", ".join(
                  f"{name} {f(r['recovery']['final_accuracy'])} ({f(r['recovery']['source_accuracy'])}) after "
                  f"{r['recovery']['steps']} steps, {r['recovery']['wall_s'] / 60:.1f} min"
                  for name, r in rows.items()) + ".",
              "", "| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def _student_text(cost: dict | None) -> list[str]:
    """The pruning's cost to the student itself (student_cost), when the run measured it."""
    if cost is None:
        return []
    return [f"The student itself, pruned to the same vocabulary (PyTorch FP32, exact on texts whose tokens were all "
            f"kept): test {cost['accuracy_unpruned']:.4f} → {cost['accuracy_pruned']:.4f} ({cost['points']:+.2f} pt; "
            f"{cost['texts_lost']} texts lost, {cost['texts_gained']} gained): what the pruning costs before any "
            "conversion."]


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(bench.ROOT)) if p.is_relative_to(bench.ROOT) else str(path)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=list(bench.SUITES), default="toutiao")
    p.add_argument("--steps", type=int, default=600, help="recovery steps per conversion (default 600)")
    p.add_argument("--train-rows", type=int, help="distil on the first N training rows (default: all)")
    p.add_argument("--work", type=Path, help="folder for the converted models, exports and caches (default: a "
                                             "new temporary folder)")
    p.add_argument("--student", type=Path, help="override the suite's student (a Hugging Face folder)")
    p.add_argument("--data", type=Path, help="override the suite's data folder (train/dev/test.jsonl)")
    p.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "RESULTS.md",
                   help="the file whose vocab:<suite> section is written (default benchmarks/RESULTS.md); "
                        "vocab-<suite>.{json,md} go to results/ beside it")
    p.add_argument("--seed", type=int, default=0, help="mapping and recovery seed (default 0; another adds -s<N> to "
                                                        "the section)")
    p.add_argument("--bottleneck", type=int, default=128, help="MobileBERT bottleneck (default 128)")
    p.add_argument("--ffn", type=int, default=4, help="MobileBERT stacked FFNs per layer (default 4; another value "
                                                      "writes the section vocab:<suite>-ffn<N>)")
    p.add_argument("--vocab-size", type=int, help="keep at most this many tokens (the most frequent; mbconvert "
                                                   "--vocab-size); adds -v<N> to the section name")
    p.add_argument("--vocab-fill", action="store_true", help="with --vocab-size: fill the room left with the dropped "
                   "words that change the student's prediction most (mbconvert --vocab-fill); adds -fill to the section")
    p.add_argument("--vocab-min-count", type=int, default=1, help="keep only tokens seen at least N times in the "
                   "training texts (mbconvert --vocab-min-count; default 1); another value adds -m<N> to the section")
    p.add_argument("--embedding-bits", type=int, default=8, choices=(8, 4),
                   help="word-embedding bits in both INT8 files (mbconvert export --embedding-bits; default 8); 4 "
                        "adds -e4 to the section")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    args = p.parse_args()
    section = (args.suite + (f"-ffn{args.ffn}" if args.ffn != 4 else "")
               + (f"-m{args.vocab_min_count}" if args.vocab_min_count != 1 else "")
               + (f"-v{args.vocab_size}" if args.vocab_size else "") + ("-fill" if args.vocab_fill else "")
               + ("-e4" if args.embedding_bits == 4 else "")
               + (f"-s{args.seed}" if args.seed else ""))
    if args.vocab_fill and args.vocab_size is None:  # ConvertConfig refuses it too, but only after the unpruned run
        p.error("--vocab-fill fills the vocabulary up to --vocab-size: pass it")
    for name in ("steps", "train_rows", "bottleneck", "threads", "ffn", "vocab_size", "vocab_min_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, not {value}")
    command = shlex.join(["python", "benchmarks/vocab.py", *sys.argv[1:]])
    start = time.time()
    try:  # bad markers fail now, not after the run
        section_bounds(args.results.read_text(encoding="utf-8") if args.results.is_file() else "", "vocab", section,
                       str(args.results))
        results = run(args)
    except MbconvertError as e:
        fail(str(e))
    results["wall_s"], results["command"] = time.time() - start, command
    folder = args.results.parent / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"vocab-{section}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str),
                                         encoding="utf-8")
    body = render(results, command)
    stem.with_suffix(".md").write_text(body, encoding="utf-8")
    write_section(args.results, "vocab", section, body)
    print(body)


if __name__ == "__main__":
    main()
