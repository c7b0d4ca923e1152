"""Marked sections of benchmarks/RESULTS.md written by the single-purpose benchmark scripts (vocab.py,
unlabelled.py, numerics.py, exports.py, latency.py): each owns the text between `<!-- KIND:SUITE -->` and `<!-- /KIND:SUITE -->`, keeps
its own copy in results/KIND-SUITE.md, and run.py's index rebuild puts every such copy back (`marked_copies`)."""

from __future__ import annotations

from pathlib import Path

from mbconvert.errors import ConfigError

KINDS = ("vocab", "unlabelled", "numerics", "exports", "latency", "throughput")


def marker(kind: str, suite: str, closing: bool = False) -> str:
    return f"<!-- {'/' if closing else ''}{kind}:{suite} -->"


def section_bounds(text: str, kind: str, suite: str, where: str = "the results file") -> tuple[int, int] | None:
    """Where this section starts and ends in `text` (None: not there yet); ConfigError for unpaired markers."""
    start, end = marker(kind, suite), marker(kind, suite, closing=True)
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        return i, j + len(end)
    if i >= 0 or j >= 0:
        raise ConfigError(f"{where}: unpaired {start} / {end} markers; fix them by hand")
    return None


def marked(kind: str, suite: str, body: str) -> str:
    return f"{marker(kind, suite)}\n{body.rstrip()}\n{marker(kind, suite, closing=True)}\n"


def write_section(path: Path, kind: str, suite: str, body: str) -> None:
    """Replace this section's text in `path`, or append the marked section."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = marked(kind, suite, body)
    bounds = section_bounds(text, kind, suite, str(path))
    if bounds:
        text = text[:bounds[0]] + block + text[bounds[1]:].removeprefix("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    path.write_text(text, encoding="utf-8")


def marked_copies(results: Path) -> list[str]:
    """Every results/KIND-SUITE.md of the kinds above, marked, for RESULTS.md's rebuild."""
    return [marked(kind, f.stem.removeprefix(f"{kind}-"), f.read_text(encoding="utf-8"))
            for kind in KINDS for f in sorted(results.glob(f"{kind}-*.md"))]


def run_and_publish(script: str, args, kind: str, suite: str, run, render) -> None:
    """The benchmark scripts' main: `run(args)` timed, then results/KIND-SUITE.json and .md beside `args.results`, the
    marked section in `args.results`, and the section printed. `script`: its path, for the command shown."""
    import json
    import shlex
    import sys
    import time

    command = shlex.join(["python", script, *sys.argv[1:]])
    start = time.time()
    results = run(args)
    results["wall_s"], results["command"] = time.time() - start, command
    folder = args.results.parent / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}-{suite}.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    body = render(results, command)
    (folder / f"{kind}-{suite}.md").write_text(body, encoding="utf-8")
    write_section(args.results, kind, suite, body)
    print(body)
