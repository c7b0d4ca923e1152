"""Copy into your training repo's tests/: the run fails when the converted model drifts from the baseline.

Needs mbconvert installed (its pytest plugin loads automatically). Paths are relative to pytest's rootdir.
Make the baseline once, from a model you trust:

    mbconvert check out/ --against student.pt --data test.jsonl --report checkpoints/baseline
    cp checkpoints/baseline/report.json baseline.json
"""

import pytest


@pytest.mark.mbconvert_gate(model="out/", against="student.pt", data="test.jsonl",
                            baseline="baseline.json", tolerance=0.5)
def test_converted_model_has_not_drifted():
    """Runs `mbconvert check` (report in out/report/) and gates it against baseline.json."""


def test_latency_and_size_stay_in_bounds(mbconvert_gate):
    """The fixture form: reuse the report written above and also bound latency and size."""
    result = mbconvert_gate(report="out/report/report.json", baseline="baseline.json",
                            max_latency_ratio=1.25, max_size_ratio=1.05)
    assert result.passed  # a failing gate has already failed the test with its summary
