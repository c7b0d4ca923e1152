"""pytest plugin: an accuracy drift of a converted model fails the test run of the repo that trains it.

Loaded through the `pytest11` entry point whenever mbconvert is installed, so importing this module must
stay cheap: torch, transformers and matplotlib are imported only when a gate actually runs.

    @pytest.mark.mbconvert_gate(model="out/", against="student.pt", data="test.jsonl",
                                baseline="baseline.json", tolerance=0.005)
    def test_converted_model_has_not_drifted():
        pass

    def test_explicit(mbconvert_gate):
        mbconvert_gate(report="out/report/report.json", baseline="baseline.json")

`model` is the converted MobileBERT, `against` the source model it was converted from, `data` labelled test data.
Relative paths are resolved against pytest's rootdir, so the same test works from any working directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MARKER = "mbconvert_gate"
MARKER_HELP = (
    f"{MARKER}(baseline, model=None, against=None, data=None, report=None, tolerance=0.5 (points), "
    "max_latency_ratio=None, max_size_ratio=None, tokenizer=None, repeats=None, threads=None): run `mbconvert "
    "check` on model (the converted MobileBERT) against the source model on data (or read an existing report=) and "
    "gate it against the baseline report.json; the test fails when the gate does"
)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


def run_gate(root: Path, *, baseline: str, model: str | None = None, against: str | None = None,
             data: str | None = None, report: str | None = None, tolerance: float | None = None,
             max_latency_ratio: float | None = None, max_size_ratio: float | None = None,
             tokenizer: str | None = None, repeats: int | None = None, threads: int | None = None):
    """Check (unless a report is given) then gate; returns the GateResult. Check reports go to MODEL/report.
    `tolerance` is in accuracy points (default: GateConfig's)."""
    from .config import CheckConfig, GateConfig
    from .gating import gate

    def resolve(p):
        return None if p is None else str(Path(root, p))

    if report is None:
        if not (model and against and data):
            raise pytest.UsageError(f"{MARKER}: pass report=..., or model=, against= and data= to run a check")
        from .pipeline import check_checkpoint

        cfg = CheckConfig(threads=threads, **({"latency_repeats": repeats} if repeats is not None else {}))
        model_dir = Path(resolve(model))
        report_dir = (model_dir if model_dir.is_dir() else model_dir.parent) / "report"
        check_checkpoint(str(model_dir), resolve(against), resolve(data), config=cfg, report_dir=report_dir,
                         tokenizer=resolve(tokenizer))
        report = str(report_dir / "report.json")
    else:
        report = resolve(report)
    tolerance = GateConfig().tolerance if tolerance is None else tolerance
    return gate(report, resolve(baseline), GateConfig(tolerance=tolerance, max_latency_ratio=max_latency_ratio,
                                                      max_size_ratio=max_size_ratio))


def _enforce(root: Path, **kwargs):
    """Run the gate; a failed gate or bad input fails the test with a readable message, not a traceback."""
    from .errors import MbconvertError

    try:
        result = run_gate(root, **kwargs)
    except MbconvertError as e:
        pytest.fail(f"mbconvert: error: {e}", pytrace=False)
    if not result.passed:
        pytest.fail(result.summary(), pytrace=False)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item) -> None:
    """A marked test gates before its body runs, so a drift shows up as that test's failure."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return
    if marker.args:
        raise pytest.UsageError(f"{MARKER}: use keyword arguments only (baseline=..., model=..., ...)")
    _enforce(item.config.rootpath, **marker.kwargs)


@pytest.fixture
def mbconvert_gate(request):
    """A callable taking the marker's keyword arguments; returns the GateResult or fails the test."""

    def check_and_gate(**kwargs):
        return _enforce(request.config.rootpath, **kwargs)

    return check_and_gate
