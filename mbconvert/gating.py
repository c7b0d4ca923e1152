"""Stage 6 — gate: compare a check report with a baseline report and fail CI when the model regressed.

Only the converted model's numbers are compared: accuracy always (a drop in points against `tolerance`); batch-1
latency and file size against optional ratios. Reports that cannot be compared are bad input (DataError, exit 2),
not a regression: measured on other test data or labels, or against another source model. A latency bound also
needs both reports timed on the same machine with the same torch threads (ConfigError otherwise): a latency ratio
across machines measures the machines. Reading a report needs no torch, so the gate is fast in CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import GateConfig
from .fileio import read_json
from .errors import ConfigError, DataError
from .report import SCHEMA_VERSION

MACHINE_KEYS = ("system", "architecture", "processor", "cpu_count")  # what makes latencies comparable (not the OS build)


@dataclass
class GateCheck:
    """One compared number: what it was, what it is, the allowed bound, and whether it holds."""

    name: str
    baseline: float
    current: float
    change: str  # human-readable change, e.g. "-1.50 points" or "×1.31"
    bound: str  # e.g. "drop ≤ 0.50 points", "≤ ×1.20", "not bounded"
    passed: bool


@dataclass
class GateResult:
    report_path: str
    baseline_path: str
    checks: list[GateCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a noisy latency measurement

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        """Every compared number, any notes, then a PASS/FAIL line naming what changed."""
        lines = [f"mbconvert gate: {self.report_path} vs baseline {self.baseline_path}"]
        for c in self.checks:
            lines.append(f"  {c.name:<22}{_fmt(c.name, c.baseline):>12} → {_fmt(c.name, c.current):<12}"
                         f"{c.change:<16}({c.bound})  {'ok' if c.passed else 'FAIL'}")
        lines += [f"  note: {n}" for n in self.notes]
        failed = [f"{c.name} {c.change} ({c.bound})" for c in self.checks if not c.passed]
        lines.append("FAIL: " + "; ".join(failed) if failed else "PASS: no regression against the baseline")
        return "\n".join(lines)


def _fmt(name: str, value: float) -> str:
    if name == "accuracy":
        return f"{100 * value:.2f}%"
    if name.startswith("latency"):
        return f"{value:.2f} ms"
    return f"{value / 2 ** 20:.2f} MB"


# ----------------------------------------------------------------------------------------------- reading reports

def _get(report: dict, dotted: str, path):
    """report["a"]["b"][0]... for "a.b[0]...", or a one-line DataError naming what is missing."""
    value = report
    for part in dotted.replace("[", ".[").split("."):
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: incomplete report: {dotted} is missing") from None
    return value


def _number(report: dict, dotted: str, path, lo: float = 0.0, hi: float = math.inf, integer: bool = False):
    value = _get(report, dotted, path)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise DataError(f"{path}: bad report: {dotted} is {value!r}, not a{'n integer' if integer else ' number'}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise DataError(f"{path}: bad report: {dotted} is {value!r}, outside [{lo:g}, {hi:g}]")
    return value


def load_report(path: str | Path) -> dict:
    """A report.json with the numbers the gate needs, of the right types, or a one-line DataError saying what is
    wrong (a hand-edited or truncated report must not pass or fail the gate by accident)."""
    path = Path(path)
    report = read_json(path, DataError, missing="no such report (run `mbconvert check` first)")
    if not isinstance(report, dict) or "schema_version" not in report:
        raise DataError(f"{path}: not an mbconvert report (no schema_version)")
    version = report["schema_version"]
    if version != SCHEMA_VERSION:
        numbered = isinstance(version, int) and not isinstance(version, bool)
        which = ("an older" if version < SCHEMA_VERSION else "a newer") if numbered else "another"
        raise DataError(f"{path}: report schema {version!r} is from {which} mbconvert (this one reads schema "
                        f"{SCHEMA_VERSION}); rerun `mbconvert check` to regenerate it")
    _number(report, "models.converted.accuracy", path, 0, 1)
    _number(report, "models.converted.size.file_bytes", path, 1, integer=True)
    latency = _get(report, "models.converted.latency", path)
    if not isinstance(latency, list) or not latency:
        raise DataError(f"{path}: bad report: models.converted.latency has no latency measurements")
    for i in range(len(latency)):
        _number(report, f"models.converted.latency[{i}].batch_size", path, 1, integer=True)
        _number(report, f"models.converted.latency[{i}].median_ms", path, 0)
    _number(report, "threads", path, 1, integer=True)
    if not isinstance(_get(report, "machine", path), dict):
        raise DataError(f"{path}: bad report: machine is not a description of the machine")
    _get(report, "inputs.tokens_sha256", path)
    return report


# ----------------------------------------------------------------------------------------------- comparability

def _same_data(report: dict, baseline: dict, report_path, baseline_path) -> None:
    """Accuracy on different data, labels or against another source model says nothing about drift; refuse
    rather than pass or fail wrongly. Compares what both reports record."""
    a, b = report["inputs"], baseline["inputs"]
    if a.get("data_sha256") and b.get("data_sha256") and a["data_sha256"] != b["data_sha256"]:
        raise DataError(f"{report_path} and {baseline_path} were measured on different test data "
                        "(data_sha256 differs): regenerate the baseline on the same data")
    if a.get("tokens_sha256") != b.get("tokens_sha256"):  # same file, read differently: another length or tokenizer
        raise DataError(f"{report_path} and {baseline_path} were measured on different test data (tokens_sha256 "
                        f"differs: sequence length {a.get('seq_len')} vs {b.get('seq_len')}, or another tokenizer): "
                        "check with the baseline's --max-length and tokenizer")
    if a.get("labels") != b.get("labels"):
        raise DataError(f"{report_path} and {baseline_path} have different labels: {a.get('labels')} vs "
                        f"{b.get('labels')}")
    ha, hb = (r["models"]["source"].get("weights_sha256") if isinstance(r["models"].get("source"), dict)
              else None for r in (report, baseline))
    if ha and hb and ha != hb:
        raise DataError(f"{report_path} and {baseline_path} were checked against a different source model "
                        "(weights_sha256 differs): regenerate the baseline against the same source")


def _same_machine(report: dict, baseline: dict, report_path, baseline_path) -> None:
    """A latency ratio is only meaningful between runs on one machine with one thread count."""
    if report["threads"] != baseline["threads"]:
        raise ConfigError(f"cannot gate latency: {report_path} was measured with {report['threads']} torch threads, "
                          f"{baseline_path} with {baseline['threads']} (pass the same --threads to both checks)")
    a, b = ({k: r["machine"].get(k) for k in MACHINE_KEYS} for r in (report, baseline))
    if a != b:
        diff = ", ".join(f"{k} {b[k]!r} → {a[k]!r}" for k in MACHINE_KEYS if a[k] != b[k])
        raise ConfigError(f"cannot gate latency: {report_path} and {baseline_path} were measured on a different "
                          f"machine ({diff}); drop --max-latency-ratio or regenerate the baseline here")


def _batch1_latency(report: dict) -> dict:
    """The smallest measured batch (batch 1 by default): the interactive latency users feel."""
    return min(report["models"]["converted"]["latency"], key=lambda x: x["batch_size"])


# ----------------------------------------------------------------------------------------------- the gate

def _ratio_check(name: str, base: float, cur: float, bound: float | None) -> GateCheck:
    ratio = cur / base if base > 0 else float("inf")
    ok = bound is None or ratio <= bound
    return GateCheck(name, base, cur, f"×{ratio:.2f}", "not bounded" if bound is None else f"≤ ×{bound:.2f}", ok)


def _latency_check(report: dict, baseline: dict, config: GateConfig, paths) -> tuple[GateCheck, list[str]]:
    base, cur = _batch1_latency(baseline), _batch1_latency(report)
    notes = []
    if config.max_latency_ratio is not None:
        _same_machine(report, baseline, *paths)
        if base["batch_size"] != cur["batch_size"]:
            raise DataError(f"latency was measured at batch {cur['batch_size']} in {paths[0]} but batch "
                            f"{base['batch_size']} in {paths[1]}")
        notes = [f"the {which} latency at batch {x['batch_size']} was noisy (IQR > 20% of the median)"
                 for which, x in (("baseline", base), ("current", cur)) if x.get("noisy")]
    check = _ratio_check(f"latency (batch {cur['batch_size']})", float(base["median_ms"]), float(cur["median_ms"]),
                         config.max_latency_ratio)
    return check, notes


def gate(report_path: str | Path, baseline_path: str | Path, config: GateConfig = GateConfig()) -> GateResult:
    """Fail when accuracy dropped by more than `tolerance` points, or latency/size grew beyond the optional ratios."""
    report, baseline = load_report(report_path), load_report(baseline_path)
    _same_data(report, baseline, report_path, baseline_path)
    result = GateResult(str(report_path), str(baseline_path))
    base_acc = float(baseline["models"]["converted"]["accuracy"])
    cur_acc = float(report["models"]["converted"]["accuracy"])
    change = 100 * (cur_acc - base_acc)  # points
    result.checks.append(GateCheck("accuracy", base_acc, cur_acc, f"{change:+.2f} points",
                                   f"drop ≤ {config.tolerance:.2f} points", -change <= config.tolerance + 1e-9))
    latency, result.notes = _latency_check(report, baseline, config, (report_path, baseline_path))
    result.checks.append(latency)
    result.checks.append(_ratio_check("size", float(baseline["models"]["converted"]["size"]["file_bytes"]),
                                      float(report["models"]["converted"]["size"]["file_bytes"]),
                                      config.max_size_ratio))
    return result
