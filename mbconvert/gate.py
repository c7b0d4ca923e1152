"""Stage 6 — gate: compare a check report with a baseline report and fail CI when the model regressed.

Only the converted model's numbers are compared (accuracy always; batch-1 latency and file size when a bound
is set). Reports measured on different data cannot be compared: that is bad input (DataError, exit 2), not
a regression. Reading a report needs no torch, so the gate is fast in CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import GateConfig
from .errors import DataError
from .report import SCHEMA_VERSION


@dataclass
class GateCheck:
    """One compared number: what it was, what it is, the allowed bound, and whether it holds."""

    name: str
    baseline: float
    current: float
    change: str  # human-readable change, e.g. "−1.50 points" or "×1.31"
    bound: str  # e.g. "drop ≤ 0.50 points", "≤ ×1.20", "not bounded"
    passed: bool


@dataclass
class GateResult:
    report_path: str
    baseline_path: str
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        """Every compared number, then a PASS/FAIL line naming what changed."""
        lines = [f"mbconvert gate: {self.report_path} vs baseline {self.baseline_path}"]
        for c in self.checks:
            lines.append(f"  {c.name:<22}{_fmt(c.name, c.baseline):>12} → {_fmt(c.name, c.current):<12}"
                         f"{c.change:<16}({c.bound})  {'ok' if c.passed else 'FAIL'}")
        failed = [f"{c.name} {c.change} ({c.bound})" for c in self.checks if not c.passed]
        lines.append("FAIL: " + "; ".join(failed) if failed else "PASS: no regression against the baseline")
        return "\n".join(lines)


def _fmt(name: str, value: float) -> str:
    if name == "accuracy":
        return f"{value:.4f}"
    if name.startswith("latency"):
        return f"{value:.2f} ms"
    return f"{value / 2 ** 20:.2f} MB"


def load_report(path: str | Path) -> dict:
    """A report.json with the numbers the gate needs, or a one-line DataError saying what is wrong."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such report (run `mbconvert check` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable report.json ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise DataError(f"{path}: not an mbconvert report (no schema_version)")
    if report["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: report schema {report['schema_version']!r}, this mbconvert reads "
                        f"{SCHEMA_VERSION}; rerun `mbconvert check` to regenerate it")
    try:
        converted = report["models"]["converted"]
        float(converted["accuracy"]), int(converted["size"]["file_bytes"])
        [float(x["median_ms"]) for x in converted["latency"]]
        report["inputs"]["tokens_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: incomplete report (missing or bad {e})") from None
    return report


def _same_data(report: dict, baseline: dict, report_path, baseline_path) -> None:
    """Accuracy on different data says nothing about drift; refuse rather than pass or fail wrongly."""
    a, b = report["inputs"], baseline["inputs"]
    key = "data_sha256" if a.get("data_sha256") and b.get("data_sha256") else "tokens_sha256"
    if a.get(key) != b.get(key):
        raise DataError(f"{report_path} and {baseline_path} were measured on different test data "
                        f"({key} differs): regenerate the baseline on the same data")
    if a.get("labels") != b.get("labels"):
        raise DataError(f"{report_path} and {baseline_path} have different labels: {a.get('labels')} vs "
                        f"{b.get('labels')}")


def _batch1_latency(report: dict) -> tuple[int, float]:
    """The smallest measured batch (batch 1 by default): the interactive latency users feel."""
    entry = min(report["models"]["converted"]["latency"], key=lambda x: x["batch_size"])
    return entry["batch_size"], float(entry["median_ms"])


def _ratio_check(name: str, base: float, cur: float, bound: float | None) -> GateCheck:
    ratio = cur / base if base > 0 else float("inf")
    ok = bound is None or ratio <= bound
    return GateCheck(name, base, cur, f"×{ratio:.2f}", "not bounded" if bound is None else f"≤ ×{bound:.2f}", ok)


def gate(report_path: str | Path, baseline_path: str | Path, config: GateConfig = GateConfig()) -> GateResult:
    """Fail when accuracy dropped by more than `tolerance`, or latency/size grew beyond the optional ratios."""
    report, baseline = load_report(report_path), load_report(baseline_path)
    _same_data(report, baseline, report_path, baseline_path)
    result = GateResult(str(report_path), str(baseline_path))
    base_acc = float(baseline["models"]["converted"]["accuracy"])
    cur_acc = float(report["models"]["converted"]["accuracy"])
    drop = base_acc - cur_acc
    result.checks.append(GateCheck("accuracy", base_acc, cur_acc, f"{0.0 - 100 * drop:+.2f} points",
                                   f"drop ≤ {100 * config.tolerance:.2f} points", drop <= config.tolerance + 1e-9))
    (bb, base_ms), (rb, cur_ms) = _batch1_latency(baseline), _batch1_latency(report)
    if bb != rb and config.max_latency_ratio is not None:
        raise DataError(f"latency was measured at batch {rb} in {report_path} but batch {bb} in {baseline_path}")
    result.checks.append(_ratio_check(f"latency (batch {rb})", base_ms, cur_ms, config.max_latency_ratio))
    result.checks.append(_ratio_check("size", float(baseline["models"]["converted"]["size"]["file_bytes"]),
                                      float(report["models"]["converted"]["size"]["file_bytes"]),
                                      config.max_size_ratio))
    return result
