"""How long batch-1 latency stays slow after sustained load, and whether plain arithmetic slows with it (issue 20).

    python benchmarks/slowdown.py --model <an ONNX file> [--burn-s 60] [--after-s 150]

benchmarks/latency.py found the same onnxruntime child up to 2× slower right after its parent trained for 60 s than
from an idle parent, with no process of this VM busy meanwhile and no steal time. This probe separates the
candidate causes. One process that does nothing else measures, every `--every-s` seconds:

- the model's batch-1 latency (onnxruntime, 2 threads, median of 50 runs), and
- a fixed pure-compute loop on one thread (numpy float64 multiply-adds on a 64 KB array, median of 20): no
  allocator, no thread pool, no onnxruntime, only the core's speed,

first `--before-s` seconds idle, then while nothing runs after `--burn-s` seconds of 2-thread PyTorch matrix
products in a child (this process waits, idle). If both slow down together and recover together, the core itself ran slower (the
host's frequency or CPU-time policy: a VM cannot see it); if only the model does, it is state inside the process
tree (caches, allocator, thread pools). Prints a table and writes `--out` JSON (default: results/slowdown.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BURN = r"""
import time, torch
torch.set_num_threads(2)
a, b = torch.randn(512, 512), torch.randn(512, 512)
end = time.time() + {seconds}
while time.time() < end:
    a = torch.tanh(a @ b)
"""


def arithmetic_ms(repeats: int = 5) -> float:
    """A fixed single-thread numpy loop, median of `repeats` runs: this VM's core speed right now. The
    host slows the whole core by up to 1.4× in episodes of a few seconds, idle or not (NOTES "Inference speed");
    this loop slows with the models, so it tells which measurements an episode hit."""
    import numpy as np

    x, times = np.random.default_rng(0).random(8192), []
    for _ in range(repeats):
        t = time.perf_counter()
        y = x
        for _ in range(200):
            y = y * 0.999 + 0.001
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


class Probe:
    """The model's onnxruntime session (2 threads) and the arithmetic loop, in this process (no torch here)."""

    def __init__(self, model: Path):
        import numpy as np
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
        self.session = ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
        ids = (np.arange(32, dtype=np.int64).reshape(1, 32) % 97) + 1  # mbconvert.export.latency_feeds(1, 32)
        self.feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for _ in range(10):
            self.session.run(None, self.feeds)

    @staticmethod
    def _median_ms(f, n: int) -> float:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1000

    def __call__(self) -> dict:
        return {"model_ms": round(self._median_ms(lambda: self.session.run(None, self.feeds), 50), 4),
                "arith_ms": round(arithmetic_ms(20), 4)}


def series(probe: Probe, seconds: float, every: float, phase: str, start: float) -> list[dict]:
    rows, end = [], time.time() + seconds
    while time.time() < end:
        t = time.time()
        rows.append({"phase": phase, "t_s": round(t - start, 1), **probe()})
        print(f"{phase:>6} {rows[-1]['t_s']:7.1f} s  model {rows[-1]['model_ms']:.3f} ms  "
              f"arithmetic {rows[-1]['arith_ms']:.3f} ms", flush=True)
        time.sleep(max(0.0, every - (time.time() - t)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="an ONNX file with input_ids/attention_mask/"
                                                               "token_type_ids inputs")
    p.add_argument("--before-s", type=float, default=30.0)
    p.add_argument("--burn-s", type=float, default=60.0)
    p.add_argument("--after-s", type=float, default=150.0)
    p.add_argument("--every-s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "slowdown.json")
    args = p.parse_args()
    probe = Probe(args.model)
    start = time.time()
    rows = series(probe, args.before_s, args.every_s, "idle", start)
    burn_start = time.time() - start
    subprocess.run([sys.executable, "-c", BURN.format(seconds=args.burn_s)], check=True)
    burn_end = time.time() - start
    rows += series(probe, args.after_s, args.every_s, "after", start)
    idle = {k: statistics.median(r[k] for r in rows if r["phase"] == "idle") for k in ("model_ms", "arith_ms")}
    result = {"model": str(args.model), "burn_s": [round(burn_start, 1), round(burn_end, 1)], "idle_median": idle,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"idle medians: model {idle['model_ms']:.3f} ms, arithmetic {idle['arith_ms']:.3f} ms; burn "
          f"{burn_start:.0f}–{burn_end:.0f} s")


if __name__ == "__main__":
    main()
