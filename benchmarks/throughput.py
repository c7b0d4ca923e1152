"""Recovery throughput on 1 vs 2 CPU processes (issue 19): texts/s of the teacher-logit pass, steps/s of training.

    python benchmarks/throughput.py --mapped <a converted Toutiao MobileBERT folder>

The same `mbconvert recover` command (fixed steps, global batch 32, the first `--rows` Toutiao training rows, a fresh
cache so the teacher's logits are computed) run (a) as one process with 2 threads and (b) under
`torchrun --nproc_per_node 2` with 1 thread per process (gloo): the teacher pass is split across the processes,
each trains on its half of every batch. Times come from each run's recovery.json (`teacher_logits_s`, the stages'
seconds). Writes results/throughput-toutiao.{json,md} and the marked section `<!-- throughput:toutiao -->` of
benchmarks/RESULTS.md. No GPU rows: none was lent to this project's sessions (the GPU commands are in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from sections import run_and_publish  # noqa: E402

LAUNCH = {1: [sys.executable, "-m", "mbconvert"],
          2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "mbconvert"]}


def one(processes: int, args, work: Path, train: Path) -> dict:
    out = work / f"recovered-{processes}"
    threads = 2 // processes
    cmd = LAUNCH[processes] + ["recover", str(args.mapped), "--source", str(args.student), "--train", str(train),
                               "--steps", str(args.steps), "--batch-size", "32", "--layerwise-share", "0",
                               "--no-early-stop", "--keep-last", "--threads", str(threads), "--device", "cpu",
                               "--cache-dir", str(work / f"cache-{processes}"), "-o", str(out), "--overwrite"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, cwd=bench.ROOT)
    summary = json.loads((out / "recovery.json").read_text(encoding="utf-8"))
    summary = summary.get("recovery", summary)
    train_s = sum(s["seconds"] for s in summary["stages"].values())
    steps = sum(s["steps"] for s in summary["stages"].values())
    return {"processes": processes, "threads_per_process": threads, "rows": summary["train_rows"],
            "teacher_logits_s": summary.get("teacher_logits_s"),
            "teacher_texts_per_s": (round(summary["train_rows"] / summary["teacher_logits_s"], 1)
                                    if summary.get("teacher_logits_s") else None),
            "steps": steps, "train_s": round(train_s, 1), "steps_per_s": round(steps / train_s, 3),
            "command": " ".join(cmd[cmd.index("recover") - 2:] if processes == 1 else cmd[2:])}


def run(args) -> dict:
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    data = bench.SUITES["toutiao"]["data"]
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[:args.rows]
    train = work / "train.jsonl"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = [one(p, args, work, train) for p in (1, 2)]
    return {"date": str(date.today()), "rows": len(lines), "steps": args.steps,
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
            "runs": runs}


def render(r: dict, command: str) -> str:
    lines = ["## Recovery throughput, 1 vs 2 CPU processes (issue 19) — Toutiao MobileBERT (4L, bottleneck 128)", "",
             f"Command: `{command}` · date {r['date']} · {r['machine']['processor']}, {r['machine']['cpu_count']} "
             f"CPUs · wall time {r['wall_s'] / 60:.1f} min · {r['rows']:,} training rows, {r['steps']} steps at global "
             "batch 32, task stage only", "",
             "| processes × threads | teacher-logit pass | texts/s | training | steps/s |", "|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['processes']} × {x['threads_per_process']} | {x['teacher_logits_s']} s | "
                     f"{x['teacher_texts_per_s']} | {x['train_s']} s for {x['steps']} steps | {x['steps_per_s']} |")
    one_, two = r["runs"]
    epoch = 1_000_000 / one_["teacher_texts_per_s"] / 60, 1_000_000 / (one_["steps_per_s"] * 32) / 60
    lines += ["", f"One epoch over 1M texts on this machine, extrapolated from the 1-process rates above (not measured): "
                  f"the teacher-logit pass {epoch[0]:.0f} min, then {epoch[1]:.0f} min of training at batch 32 "
                  "(texts this short; longer texts cost more per step).", "",
              f"On this 2-core machine two processes share the same two cores, so DDP buys nothing here "
                  f"(steps/s ×{two['steps_per_s'] / one_['steps_per_s']:.2f}); what it shows is that the path runs and "
                  "what it costs. The speed-up belongs on several GPUs or machines (not lent to this project)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mapped", type=Path, required=True, help="a converted (mapped) Toutiao MobileBERT folder")
    p.add_argument("--student", type=Path, default=bench.SUITES["toutiao"]["student"])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work", type=Path)
    p.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "RESULTS.md")
    run_and_publish("benchmarks/throughput.py", p.parse_args(), "throughput", "toutiao", run, render)


if __name__ == "__main__":
    main()
