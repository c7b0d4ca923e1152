"""Device numerics on the benchmark models (issue 17): FP16 headroom, the FP16-safe rescale, mixed precision vs INT8.

    python benchmarks/numerics.py --suite toutiao --model /tmp/vocab-toutiao/unpruned
    python benchmarks/numerics.py --suite agnews --model /tmp/vocab-agnews/unpruned

`--model`: a recovered MobileBERT folder of the suite (benchmarks/vocab.py's unpruned conversion is one). On every
test text of the suite: the peak |activation| and FP16 headroom (65504 / peak) before and after
`mbconvert.fp16.make_fp16_safe` at the default margin (16×: what `export --fp16-safe auto` does) and at a forced
margin (a target of 8, to show the rescale on a model that does not need it), the FP32 logits' change, and
model.half() on CPU: finite logits, argmax agreement with FP32 and test accuracy. Then `mbconvert export --format
onnx,onnx-int8 --precision mixed` on all test rows: sizes and accuracies of FP32, dynamic INT8 and the mixed model
(FFN/embedding weights INT8, attention FP32, accuracy guard at 1 point). Inference only: a busy machine changes the
wall time, not the numbers. Writes results/numerics-<suite>.{json,md} and the `<!-- numerics:<suite> -->` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from sections import run_and_publish  # noqa: E402

FORCED_MARGIN = 65504 / 8


def half_scores(model, test) -> dict:
    """model.half() on CPU against the FP32 model: finite rows, argmax agreement, accuracy."""
    from mbconvert.similarity import predict_logits

    fp32 = predict_logits(model, test)
    half = predict_logits(copy.deepcopy(model).half(), test).float()
    finite = torch.isfinite(half).all(-1)
    return {"finite_rows": float(finite.float().mean()),
            "agreement": float((half.argmax(-1) == fp32.argmax(-1)).float().mean()),
            "accuracy": float((half.argmax(-1) == test.labels).float().mean()),
            "accuracy_fp32": float((fp32.argmax(-1) == test.labels).float().mean())}


def run(args) -> dict:
    from mbconvert.config import ExportConfig
    from mbconvert.data import encode, label_maps, read_examples
    from mbconvert.environment import versions
    from mbconvert.fp16 import make_fp16_safe
    from mbconvert.load import load_classifier
    from mbconvert.pipeline import export_checkpoint

    torch.set_num_threads(args.threads)
    data = args.data or bench.SUITES[args.suite]["data"]
    model, tok = load_classifier(args.model)
    label2id, n = label_maps(model.config)
    test = encode(read_examples(data / "test.jsonl", label2id=label2id, num_labels=n, require_labels=True), tok,
                  cap=model.config.max_position_embeddings)
    rescale = {}
    for name, margin in (("auto (margin 16)", 16.0), (f"forced (target {65504 / FORCED_MARGIN:g})", FORCED_MARGIN)):
        safe = copy.deepcopy(model)
        report = make_fp16_safe(safe, test, margin=margin)
        rescale[name] = {"report": report, "half": half_scores(safe, test)}
        print(name, {k: report.get(k) for k in ("rescaled", "peak_before", "peak_after", "logits")}, flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"bench-numerics-{args.suite}-"))
    exported = export_checkpoint(str(args.model), ExportConfig(formats=("onnx", "onnx-int8"), precision="mixed",
                                                               max_samples=len(test), latency_batch_sizes=(),
                                                               threads=args.threads),
                                 data=data / "test.jsonl", out=work / "export")
    return {"suite": args.suite, "model": str(args.model), "date": str(date.today()), "test_rows": len(test),
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "threads": args.threads},
            "versions": versions("onnx", "onnxruntime"), "half_plain": half_scores(model, test), "rescale": rescale,
            "artifacts": {k: {kk: v.get(kk) for kk in ("file", "size_mb", "accuracy", "accuracy_fp32", "guard",
                                                        "vs_fp32", "plan")}
                          for k, v in exported["artifacts"].items()}}


def render(r: dict, command: str) -> str:
    title = bench.SUITES[r["suite"]]["title"]
    lines = [f"## Device numerics (issue 17) — {title}", "",
             f"Command: `{command}` · date {r['date']} · {r['machine']['processor']}, {r['machine']['cpu_count']} "
             f"CPUs, {r['machine']['threads']} threads · wall time {r['wall_s'] / 60:.1f} min · model "
             f"`{r['model']}` (recovered MobileBERT) · {r['test_rows']:,} test texts", "",
             "| FP16-safe rescale | streams rescaled | peak before | headroom before | peak after | headroom after | "
             "FP32 logits max rel. change | FP16 finite rows | FP16 agreement with FP32 | FP16 test acc | "
             "FP32 test acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    h = r["half_plain"]
    lines.append(f"| none (model.half() as recovered) | 0 | | | | | | {100 * h['finite_rows']:.2f}% | "
                 f"{100 * h['agreement']:.2f}% | {h['accuracy']:.4f} | {h['accuracy_fp32']:.4f} |")
    for name, x in r["rescale"].items():
        rep, half = x["report"], x["half"]
        lines.append(f"| {name} | {len(rep.get('streams', []))} | {rep['peak_before']:.3g} | "
                     f"{rep['fp16_headroom_before']:.3g} | {rep['peak_after']:.3g} | {rep['fp16_headroom_after']:.3g} | "
                     f"{rep['logits']['max_relative_change']:.2g} | {100 * half['finite_rows']:.2f}% | "
                     f"{100 * half['agreement']:.2f}% | {half['accuracy']:.4f} | {half['accuracy_fp32']:.4f} |")
    forced = list(r["rescale"].values())[-1]["report"]
    lines += ["", "Not bounded by the rescale (forced run): " + (", ".join(forced.get("unbounded", [])) or "nothing")
              + ".", "", "| ONNX model | size MB | test acc | Δ vs FP32 |", "|---|---|---|---|"]
    a = r["artifacts"]
    fp32 = a["onnx"]["accuracy"]
    for key, label in (("onnx", "FP32"), ("onnx-int8", "dynamic INT8 (every weight)"),
                       ("onnx-mixed", "mixed: FFN/embedding INT8, attention FP32")):
        if key in a:
            lines.append(f"| {label} | {a[key]['size_mb']:.2f} | {a[key]['accuracy']:.4f} | "
                         f"{100 * (a[key]['accuracy'] - fp32):+.2f} pt |")
    guard = (a.get("onnx-mixed") or {}).get("guard") or {}
    if guard:
        lines += ["", f"Accuracy guard (tolerance {guard.get('tolerance')} pt): kept at full precision: "
                  f"{', '.join(guard.get('kept_full_precision') or []) or 'nothing'}; "
                  f"{len(guard.get('steps', []))} step(s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["toutiao", "agnews"], required=True)
    p.add_argument("--model", type=Path, required=True, help="a recovered MobileBERT folder of the suite")
    p.add_argument("--data", type=Path, help="override the suite's data folder (its test.jsonl is used)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path)
    p.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()
    run_and_publish("benchmarks/numerics.py", args, "numerics", args.suite, run, render)

if __name__ == "__main__":
    main()
