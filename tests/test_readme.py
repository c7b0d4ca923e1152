"""Issue 14: every ```python block of README.md runs, so the README cannot drift from the API.

Each block runs with `exec` in a fresh namespace, in a temporary folder holding every relative file the README
names (small: a hidden-128, 2-layer student trained 100 steps). A block that defines pytest tests (the plugin
example) is then run by pytest itself (`pytester`), so its marker and keyword arguments are exercised too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import helpers

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python[ \t]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def _is_pytest_block(code: str) -> bool:
    return bool(re.search(r"^\s*@pytest\.mark\.|^def test_", code, flags=re.M))


@pytest.fixture(scope="module")
def readme_files(tmp_path_factory, tokenizer) -> Path:
    """The files the README's examples name: student.pt (a state dict, tokenizer files and labels.json beside
    it), train/dev/test.jsonl, my-finetuned-bert/ (the same student as a Hugging Face folder), and out/ (its
    conversion, written by mbconvert) with baseline.json (its check report)."""
    from mbconvert import CheckConfig, ConvertConfig, check_checkpoint, convert_checkpoint

    d = tmp_path_factory.mktemp("readme")
    rows = {name: helpers.synthetic_rows(n, seed=s) for name, n, s in (("train", 400, 1), ("dev", 64, 2),
                                                                        ("test", 64, 3))}
    for name, r in rows.items():
        helpers.write_jsonl(d / f"{name}.jsonl", r)
    model = helpers.random_student(hidden=128, layers=2, heads=2, intermediate=256)
    helpers.train_student(model, tokenizer, rows["train"], steps=100)
    helpers.save_student_pt(model, tokenizer, d)
    model.save_pretrained(str(d / "my-finetuned-bert"))
    tokenizer.save_pretrained(str(d / "my-finetuned-bert"))
    convert_checkpoint(d / "student.pt", d / "out", ConvertConfig(bottleneck=32, ffn=1), calib=d / "train.jsonl")
    check_checkpoint(d / "out", d / "student.pt", d / "test.jsonl", CheckConfig(latency_repeats=1),
                     report_dir=d / "out" / "report")
    shutil.copy(d / "out" / "report" / "report.json", d / "baseline.json")
    return d


@pytest.fixture
def workdir(readme_files, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the README's files as the working directory (a block may write beside them)."""
    work = tmp_path / "work"
    shutil.copytree(readme_files, work)
    monkeypatch.chdir(work)
    return work


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block-{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, workdir, request):
    code = BLOCKS[index]
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if _is_pytest_block(code):
        tests = [n for n, v in namespace.items() if n.startswith("test_") and callable(v)]
        assert tests, "a pytest example that defines no test"
        pytester = request.getfixturevalue("pytester")
        for item in workdir.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy)(item, pytester.path / item.name)
        checked = [pytester.path / m / "report" / "report.json" for m in re.findall(r'model="([^"]+)"', code)]
        for report in checked:  # the marker must write these anew: proof that the plugin ran the check
            shutil.rmtree(report.parent, ignore_errors=True)
        pytester.makepyfile(**{f"test_readme_block_{index}": code})
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--strict-markers")
        result.assert_outcomes(passed=len(tests))
        assert all(report.exists() for report in checked), result.stdout.str()


def test_the_gate_marker_is_registered(pytestconfig):
    """The README's plugin example relies on the `mbconvert_gate` marker being known to pytest."""
    assert any(line.startswith("mbconvert_gate") for line in pytestconfig.getini("markers"))
