"""Issue 15: the CLI's bad-input matrix. Every option of every subcommand gets an out-of-range value, generated
from the parsers themselves (a new option joins the matrix, or fails `test_every_option_is_in_the_matrix`), plus
the bad files and output folders a user can pass. Each case: exit 2, one `mbconvert: error:` line naming the option
or the value, no traceback, no output written and no input changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers
from mbconvert.cli import COMMANDS, build_parser, main

# ------------------------------------------------------------------------------------------ what each option gets
BAD_NUMBERS = {float: ["nan", "inf", "-1e9"], int: ["-7"]}
# options with neither a numeric type nor choices: the values that are out of range for them
UNTYPED = {"--budget": ["nan", "-5m"], "--device": ["bogus"], "--format": ["bogus", ","],
           "--coreml-lengths": ["0,16", "16,abc"]}
# input paths: a file that does not exist is their out-of-range value
INPUT_PATHS = {"--tokenizer", "--labels", "--calib", "--train", "--eval", "--data", "--source", "--against",
               "--baseline", "--vocab-from", "--unlabelled"}
# options with no out-of-range value of their own, and why
NOT_IN_MATRIX = {
    "--output": "an output folder: the bad ones (a file, under a file, the input, a foreign folder) have own rows",
    "--report": "check's output folder: rows below give it a file and a path under a file",
    "--cache-dir": "any writable path is valid; a failing cache is tolerated (the run recomputes)",
}
# (command, flag, value) that the generated matrix would wrongly call invalid, and why (keep this short)
VALID_AFTER_ALL: dict[tuple[str, str, str], str] = {}
SHAPE = ["--bottleneck", "32", "--ffn", "1", "--embedding-size", "32"]  # a MobileBERT that fits a hidden-64 student


def _flag(action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def _valued_options(command: str):
    for action in build_parser(command)._actions:
        if action.option_strings and action.nargs != 0 and _flag(action) not in ("--help", "--version"):
            yield action


def _bad_values(action) -> list[str]:
    flag = _flag(action)
    if action.choices:
        return ["bogus"]
    if action.type in BAD_NUMBERS:
        return BAD_NUMBERS[action.type]
    if flag in UNTYPED:
        return UNTYPED[flag]
    if flag in INPUT_PATHS:
        return ["missing.jsonl"]
    return []


MATRIX_COMMANDS = [c for c in COMMANDS if c != "demo"]
GENERATED = [pytest.param(c, _flag(a), v, id=f"{c}{_flag(a)}={v}") for c in MATRIX_COMMANDS
             for a in _valued_options(c) for v in _bad_values(a) if (c, _flag(a), v) not in VALID_AFTER_ALL]


def test_every_option_is_in_the_matrix():
    """A new option must get an out-of-range value here (or a reason in NOT_IN_MATRIX): the matrix grows with the
    CLI."""
    missing = [f"{c} {_flag(a)}" for c in MATRIX_COMMANDS for a in _valued_options(c)
               if not _bad_values(a) and _flag(a) not in NOT_IN_MATRIX]
    assert not missing, f"options without a bad-input case: {missing}"
    assert len(GENERATED) > 60


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny student folder, data files, its conversion and a check report, made once for the module."""
    root = tmp_path_factory.mktemp("bad_input")
    student = root / "student"
    helpers.random_student(hidden=64, layers=2, heads=2).save_pretrained(str(student))
    tokenizer.save_pretrained(str(student))
    e = {"root": root, "student": student, "conv": root / "conv", "report_dir": root / "report",
         "train": helpers.write_jsonl(root / "train.jsonl", helpers.synthetic_rows(64, seed=1)),
         "dev": helpers.write_jsonl(root / "dev.jsonl", helpers.synthetic_rows(32, seed=2)),
         "test": helpers.write_jsonl(root / "test.jsonl", helpers.synthetic_rows(32, seed=3))}
    assert main([str(a) for a in (student, "-o", e["conv"], *SHAPE,
                                  "--calib", e["train"])]) == 0
    code = main([str(a) for a in ("check", e["conv"], "--against", student, "--data", e["test"], "--report",
                                  e["report_dir"], "--repeats", "1", "--threads", "1")])
    assert code in (0, 1) and (e["report_dir"] / "report.json").exists()
    e["report"] = e["report_dir"] / "report.json"
    return e


def base_args(command: str, e: dict, out: Path) -> list:
    """Valid arguments for `command`, writing to `out` (test_base_arguments_are_valid proves them valid)."""
    return {
        "convert": [e["student"], "-o", out, *SHAPE, "--train", e["train"],
                    "--eval", e["dev"]],
        "recover": ["recover", e["conv"], "--source", e["student"], "--train", e["train"], "--eval", e["dev"],
                    "-o", out],
        "check": ["check", e["conv"], "--against", e["student"], "--data", e["test"], "--report", out,
                  "--repeats", "1", "--threads", "1"],
        "export": ["export", e["conv"], "--format", "onnx", "--data", e["test"], "-o", out],
        "gate": ["gate", e["report"], "--baseline", e["report"]],
        "prune-vocab": ["prune-vocab", e["student"], "--vocab-from", e["train"], "--eval", e["dev"], "-o", out],
    }[command]


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse must not exit past main(): callers get a code and one line
        pytest.fail(f"main() raised SystemExit({exit_.code}) instead of returning; stderr: "
                    f"{capsys.readouterr().err}")
    return code, capsys.readouterr().err


def assert_refused(args, capsys, e: dict, out: Path | None, mentions=(), untouched=()) -> str:
    """Exit 2, exactly one `mbconvert: error:` line (naming one of `mentions` when given), no traceback, `out` not
    created, and no file under the module's inputs (or `untouched`) changed."""
    roots = [e["root"], *untouched]
    before = [helpers.folder_state(r) for r in roots]
    code, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("mbconvert: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    if mentions:
        assert any(m.lower() in lines[0].lower() for m in mentions), lines[0]
    if out is not None:
        assert not out.exists(), f"{out} was written: {sorted(p.name for p in out.iterdir())}"
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "a temporary was left"
    assert [helpers.folder_state(r) for r in roots] == before, "an input or the model folder changed"
    return lines[0]


# ------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("command", MATRIX_COMMANDS)
def test_base_arguments_are_valid(command, env, tmp_path, capsys):
    """The matrix's otherwise-valid arguments run (so each refusal below is the bad value's)."""
    out = tmp_path / "out"
    code, err = run_cli(base_args(command, env, out), capsys)
    assert code in (0, 1) and "mbconvert: error" not in err, err
    assert command == "gate" or out.exists()


@pytest.mark.parametrize("command, flag, value", GENERATED)
def test_out_of_range_option_is_refused(command, flag, value, env, tmp_path, capsys):
    out = tmp_path / "out"
    dest = next(a.dest for a in _valued_options(command) if _flag(a) == flag)
    value_arg = str(tmp_path / value) if flag in INPUT_PATHS else value
    args = [*base_args(command, env, out), f"{flag}={value_arg}"]
    assert_refused(args, capsys, env, out, mentions=(flag.lstrip("-"), dest, dest.replace("_", " "), value))


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--steps", "0"), ("--budget", "-5m")])
def test_recovery_options_are_checked_without_train(flag, value, env, tmp_path, capsys):
    """`mbconvert SOURCE --lr nan` (no --train) is refused, not silently ignored."""
    out = tmp_path / "out"
    assert_refused([env["student"], "-o", out, *SHAPE, f"{flag}={value}"], capsys, env, out,
                   mentions=(flag.lstrip("-"), value))


# ------------------------------------------------------------------------------------------ bad files and folders
def _folder_as_data(e, d):
    (d / "data.jsonl").mkdir()
    return d / "data.jsonl"


def _csv_with_a_field_of(chars: int, d: Path) -> Path:
    rows = helpers.synthetic_rows(8, seed=4)
    text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    (d / "data.csv").write_text(text + f"{'一' * chars},news_a\n", encoding="utf-8")
    return d / "data.csv"


def _huge_field_csv(e, d):
    from mbconvert.data import MAX_FIELD_CHARS

    return _csv_with_a_field_of(MAX_FIELD_CHARS + 1, d)


def _fractional_label(e, d):
    rows = helpers.synthetic_rows(8, seed=4)
    rows[3] = {"text": rows[3]["text"], "label": 1.7}
    return helpers.write_jsonl(d / "data.jsonl", rows)


BAD_DATA = {"a folder": _folder_as_data, "a field over MAX_FIELD_CHARS": _huge_field_csv,
            "a label of 1.7": _fractional_label}
DATA_OPTION = {"convert": "--train", "recover": "--train", "check": "--data", "export": "--data"}


@pytest.mark.parametrize("command", DATA_OPTION)
@pytest.mark.parametrize("bad", BAD_DATA)
def test_bad_data_file_is_refused(bad, command, env, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    data = BAD_DATA[bad](env, d)
    out = tmp_path / "out"
    assert_refused([*base_args(command, env, out), f"{DATA_OPTION[command]}={data}"], capsys, env, out,
                   mentions=(data.name,), untouched=[d])


@pytest.mark.parametrize("command", ["convert", "check"])
def test_a_csv_field_over_pythons_default_limit_is_read(command, env, tmp_path, capsys):
    """131,073 characters: over the csv module's default field limit (131,072), which once gave a traceback; a
    long text is data (truncated when tokenised), not an error."""
    data = _csv_with_a_field_of(131_073, tmp_path)
    code, err = run_cli([*base_args(command, env, tmp_path / "out"), f"{DATA_OPTION[command]}={data}"], capsys)
    assert code in (0, 1) and "Traceback" not in err and "mbconvert: error" not in err, err


def _output_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    return tmp_path / "out"


def _output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    return tmp_path / "file" / "out"


@pytest.mark.parametrize("command", ["convert", "recover", "check", "export"])
@pytest.mark.parametrize("make_out", [_output_is_a_file, _output_under_a_file])
def test_output_that_cannot_be_a_folder_is_refused(make_out, command, env, tmp_path, capsys):
    out = make_out(tmp_path)
    before = helpers.folder_state(tmp_path)
    code, err = run_cli(base_args(command, env, out), capsys)
    lines = [line for line in err.splitlines() if line.startswith("mbconvert: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert helpers.folder_state(tmp_path) == before


@pytest.mark.parametrize("command", ["convert", "recover"])
def test_output_equal_to_the_source_folder_is_refused(command, env, tmp_path, capsys):
    args = base_args(command, env, env["student"])
    assert_refused(args, capsys, env, None, mentions=("input",))


def test_recover_refuses_a_bert_student_folder(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(["recover", env["student"], "--source", env["student"], "--train", env["train"], "-o", out],
                   capsys, env, out, mentions=("converted",))


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--temperature", "0")])
def test_recover_refuses_impossible_recipe_without_writing(flag, value, env, capsys):
    """Without -o, recover rewrites the model folder: a bad value must leave it as it was."""
    assert_refused(["recover", env["conv"], "--source", env["student"], "--train", env["train"], f"{flag}={value}"],
                   capsys, env, None, mentions=(flag.lstrip("-"),))


def test_foreign_output_folder_is_refused_then_replaced_whole_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not mbconvert's")
    args = [env["student"], "-o", out, *SHAPE]
    assert_refused(args, capsys, env, None, mentions=("--overwrite",), untouched=[out])
    code, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()


# ------------------------------------------------------------------------------------------ --resume
@pytest.fixture(scope="module")
def finished_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "out"
    args = [env["student"], "-o", out, *SHAPE, "--train", env["train"], "--steps", "2"]
    assert main([str(a) for a in args]) == 0
    assert json.loads((out / "recovery.json").read_text())["steps"] == 2
    return out, args


def test_resume_of_a_finished_run_is_a_no_op(finished_run, capsys):
    out, args = finished_run
    weights = (out / "model.safetensors").read_bytes()
    before = helpers.folder_state(out)
    code, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() == weights
    assert helpers.folder_state(out) == before


def test_resume_with_other_training_texts_is_refused(finished_run, env, tmp_path, capsys):
    out, args = finished_run
    other = helpers.write_jsonl(tmp_path / "other.jsonl", helpers.synthetic_rows(64, seed=9))
    args = [other if a == env["train"] else a for a in args]
    assert_refused([*args, "--resume"], capsys, env, None, mentions=("--resume",), untouched=[out])
