"""Does unlabelled text pay? (issue 19) Toutiao with labels kept on only the first N training rows.

    python benchmarks/unlabelled.py                      # N = 2,000 labelled rows, the other 25,776 as plain text

The student is converted once (calibration on the labelled rows); the mapped model is then recovered twice with the
same recipe and the same number of steps (run.py's Toutiao settings, `--steps`, model selection on the dev split):
on the labelled rows alone, and on the labelled rows plus the rest of the training texts passed as `--unlabelled`
(the student labels them; only the labelled rows enter the cross-entropy). Both recoveries start from the same
mapped weights and see the same number of batches, so the only difference is the text they see. Step-counted: a
busy machine gives the same numbers, later. Writes results/unlabelled-toutiao.{json,md} and the marked section
`<!-- unlabelled:toutiao -->` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  the suites (students, data, recovery settings)
from sections import run_and_publish  # noqa: E402


def accuracy(model_dir, test: Path) -> float:
    from mbconvert.data import label_maps, read_examples, encode
    from mbconvert.load import load_classifier
    from mbconvert.similarity import predict_logits

    model, tok = load_classifier(model_dir)
    label2id, n = label_maps(model.config)
    enc = encode(read_examples(test, label2id=label2id, num_labels=n, require_labels=True), tok)
    return float((predict_logits(model, enc).argmax(-1) == enc.labels).float().mean())


def run(args) -> dict:
    from mbconvert.config import ConvertConfig, RunOptions
    from mbconvert.pipeline import convert_checkpoint, recover_checkpoint

    spec = bench.SUITES["toutiao"]
    student, data = spec["student"], spec["data"]
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-unlabelled-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    labelled, rest = rows[:args.labelled], rows[args.labelled:]
    (work / "labelled.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled),
                                         encoding="utf-8")
    (work / "unlabelled.txt").write_text("".join(r["text"].replace("\n", " ") + "\n" for r in rest),
                                         encoding="utf-8")
    run_opts = RunOptions(threads=args.threads, cache_dir=str(work / "cache"))
    mapped = work / "mapped"
    if not (mapped / "config.json").is_file():
        convert_checkpoint(str(student), mapped, ConvertConfig(seed=args.seed), calib=work / "labelled.jsonl",
                           run=run_opts)
    recovery = bench.recovery_config(None, args.seed, {**spec.get("recovery", {}), "steps": args.steps})
    results = {}
    for name, extra in (("labelled only", None), ("labelled + unlabelled", work / "unlabelled.txt")):
        out = work / name.replace(" ", "_").replace("+", "and")
        t0 = time.time()
        summary = recover_checkpoint(mapped, str(student), work / "labelled.jsonl", eval_data=data / "dev.jsonl",
                                     config=recovery, out=out, run=run_opts, unlabelled=extra, overwrite=True)
        results[name] = {"test_accuracy": accuracy(out, data / "test.jsonl"), "steps": summary["steps"],
                         "dev_accuracy": summary["final_accuracy"], "wall_s": time.time() - t0,
                         "training_rows": summary["training_rows"]}
        print(name, results[name], flush=True)
    from mbconvert.environment import versions

    return {"date": str(date.today()), "labelled": len(labelled), "unlabelled": len(rest),
            "student_test_accuracy": accuracy(student, data / "test.jsonl"),
            "mapped_test_accuracy": accuracy(mapped, data / "test.jsonl"), "recovery_config": recovery.to_dict(),
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "threads": args.threads},
            "versions": versions(), "runs": results}


def render(r: dict, command: str) -> str:
    rc, student = r["recovery_config"], r["student_test_accuracy"]
    lines = ["## Unlabelled text in recovery (issue 19) — Toutiao, labels on "
             f"{r['labelled']:,} training rows", "",
             f"Command: `{command}` · date {r['date']} · {r['machine']['processor']}, {r['machine']['cpu_count']} "
             f"CPUs, {r['machine']['threads']} threads · wall time {r['wall_s'] / 60:.1f} min", "",
             "| recovery | training rows (labelled + unlabelled) | steps | dev acc (kept weights) | test acc | "
             "Δ test vs student |", "|---|---|---|---|---|---|",
             f"| mapped, before recovery | — | 0 | — | {r['mapped_test_accuracy']:.4f} | "
             f"{100 * (r['mapped_test_accuracy'] - student):+.2f} pt |"]
    for name, x in r["runs"].items():
        t = x["training_rows"]
        lines.append(f"| {name} | {t['labelled']:,} + {t['unlabelled']:,} | {x['steps']} | {x['dev_accuracy']:.4f} | "
                     f"{x['test_accuracy']:.4f} | {100 * (x['test_accuracy'] - student):+.2f} pt |")
    a, b = (r["runs"][k]["test_accuracy"] for k in ("labelled only", "labelled + unlabelled"))
    lines += ["", f"Student (trained on all 27,776 labelled rows): test {student:.4f}. Same mapped start, same "
              f"{rc['steps']} steps (batch {rc['batch_size']}, task LR {rc['lr']:g}, layer-wise share "
              f"{rc['layerwise_share']:g}, best dev point kept). The unlabelled texts change test accuracy by "
              f"{100 * (b - a):+.2f} pt ({a:.4f} → {b:.4f}; one test text is 0.03 pt)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labelled", type=int, default=2000, help="training rows that keep their labels")
    p.add_argument("--steps", type=int, default=600, help="recovery steps of each run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path)
    p.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()
    run_and_publish("benchmarks/unlabelled.py", args, "unlabelled", "toutiao", run, render)

if __name__ == "__main__":
    main()
