"""Every export artifact of a benchmark MobileBERT, from one run (issue 16).

    python benchmarks/exports.py --suite toutiao --model /tmp/vocab-toutiao/unpruned
    python benchmarks/exports.py --suite agnews --model /tmp/vocab-agnews/unpruned

One `mbconvert export` of a recovered MobileBERT folder with every format (ONNX FP32/INT8, string-in ONNX,
ExecuTorch FP32/8-bit, LiteRT FP32/8-bit, Core ML) on the suite's whole test split: file size, parity with PyTorch
(max |Δlogit| and argmax agreement for FP32 files; against PyTorch FP32 for 8-bit ones), test accuracy where the file
runs here (Core ML predictions need macOS) and batch-1 latency on this CPU (each runtime's own timing, 2 threads,
medians; the string-in model's includes tokenisation). Writes results/exports-<suite>.{json,md} and the marked
section `<!-- exports:<suite> -->` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from sections import run_and_publish  # noqa: E402

FORMATS = ("onnx", "onnx-int8", "onnx-text", "executorch", "executorch-int8", "litert", "litert-int8", "coreml")
LABELS = {"onnx": "ONNX FP32", "onnx-int8": "ONNX INT8 (dynamic, per-channel)",
          "onnx-text": "string-in ONNX (tokenizer in the graph)", "executorch": "ExecuTorch FP32 (XNNPACK)",
          "executorch-int8": "ExecuTorch 8-bit (XNNPACK)", "litert": "LiteRT FP32", "litert-int8": "LiteRT 8-bit",
          "coreml": "Core ML"}


def run(args) -> dict:
    from mbconvert.config import ExportConfig
    from mbconvert.data import read_examples
    from mbconvert.environment import versions
    from mbconvert.pipeline import export_checkpoint

    data = args.data or bench.SUITES[args.suite]["data"]
    rows = min(len(read_examples(data / "test.jsonl", texts_only=True)), args.rows or 10**9)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"bench-exports-{args.suite}-"))
    config = ExportConfig(formats=FORMATS, max_samples=rows, latency_batch_sizes=(1,), threads=args.threads)
    report = export_checkpoint(str(args.model), config, data=data / "test.jsonl", out=work / "export")
    return {"suite": args.suite, "model": str(args.model), "date": str(date.today()), "test_rows": rows,
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "threads": args.threads},
            "versions": report.get("versions") or versions(), "inputs": report.get("inputs"),
            "artifacts": report["artifacts"]}


def _cell(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def render(r: dict, command: str) -> str:
    lines = [f"## Export artifacts (issue 16) — {bench.SUITES[r['suite']]['title']}", "",
             f"Command: `{command}` · date {r['date']} · {r['machine']['processor']}, {r['machine']['cpu_count']} "
             f"CPUs, {r['machine']['threads']} threads · wall time {r['wall_s'] / 60:.1f} min · model `{r['model']}` · "
             f"{r['test_rows']:,} test texts", "",
             "| artifact | file | MB | max \\|Δlogit\\| vs PyTorch FP32 | argmax agreement | test acc | batch-1 ms |",
             "|---|---|---|---|---|---|---|"]
    for fmt in FORMATS:
        a = r["artifacts"].get(fmt)
        if a is None:
            lines.append(f"| {LABELS[fmt]} | not written | | | | | |")
            continue
        parity = a.get("parity") or a.get("vs_fp32") or a.get("vs_onnx") or {}
        latency = (a.get("latency") or {}).get("batch1_ms")
        acc = a.get("accuracy")
        lines.append(f"| {LABELS[fmt]} | `{a['file']}` | {a['size_mb']:.2f} | {_cell(parity.get('max_abs_diff'), '.2e')} | "
                     f"{_cell(parity.get('argmax_agreement'), '.2%')} | {_cell(acc, '.4f')} | {_cell(latency, '.2f')} |")
    text = r["artifacts"].get("onnx-text") or {}
    if text.get("token_parity"):
        t = text["token_parity"]
        lines += ["", f"String-in ONNX: token ids differ from the Hugging Face tokenizer's on {t['differing']} of "
                  f"{t['texts']:,} test texts; its parity column is against `model.onnx` fed by the HF tokenizer."]
    coreml = r["artifacts"].get("coreml") or {}
    if coreml:
        lines += ["", f"Core ML: {coreml.get('precision')} package, validated by its spec on Linux (no prediction: "
                  "Core ML runs on Apple platforms only)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["toutiao", "agnews", "distilbert"], required=True)
    p.add_argument("--model", type=Path, required=True, help="a recovered MobileBERT folder of the suite")
    p.add_argument("--data", type=Path, help="override the suite's data folder (its test.jsonl is used)")
    p.add_argument("--rows", type=int, help="check on the first N test rows only (default: all; for dry runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path)
    p.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()
    run_and_publish("benchmarks/exports.py", args, "exports", args.suite, run, render)

if __name__ == "__main__":
    main()
