"""The `mbconvert` command: conversion output, and one clear line + exit 2 for every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import helpers
from mbconvert.cli import main


@pytest.fixture(scope="module")
def student_pt(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("cli_student")
    model = helpers.random_student(hidden=512, layers=4, heads=8)
    torch.save(model.state_dict(), d / "student.pt")
    tokenizer.save_pretrained(str(d))
    (d / "labels.json").write_text(json.dumps(helpers.LABELS))  # a state dict has no class names: read beside it
    return d / "student.pt"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_writes_a_folder_that_automodel_loads(student_pt, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, MobileBertForSequenceClassification

    out = tmp_path / "out"
    code, _, err = run_cli([student_pt, "--bottleneck", "128", "-o", out], capsys)
    assert code == 0, err
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert isinstance(model, MobileBertForSequenceClassification)
    c = model.config
    assert (c.hidden_size, c.intra_bottleneck_size, c.num_feedforward_networks) == (512, 128, 4)
    assert (c.hidden_act, c.normalization_type, c.num_attention_heads, c.intermediate_size) == ("relu", "no_norm", 4, 512)
    assert c.id2label == {0: "news_a", 1: "news_b", 2: "news_c", 3: "news_d"}
    tok = AutoTokenizer.from_pretrained(str(out))
    logits = model(**tok(["一丁七", "万丈"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    report = json.loads((out / "conversion.json").read_text())
    assert len(report["layers"]) == 4
    assert report["target"]["num_attention_heads"] == 4
    for layer in report["layers"]:
        assert len(layer["attention"]["heads_kept"]) == 4
        assert layer["ffn"]["neurons_kept"] == 2048


def test_same_input_and_seed_give_identical_bytes(student_pt, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli([student_pt, "--bottleneck", "64", "--ffn", "2", "-o", tmp_path / name], capsys)[0] == 0
    for f in ("model.safetensors", "config.json", "conversion.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _truncated(src, d):
    p = d / "student.pt"
    p.write_bytes(src.read_bytes()[: 10_000])
    return [p]


def _corrupt_safetensors(src, d):
    p = d / "student.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    return [p]


def _unknown_layout(src, d):
    torch.save({"encoder.blocks.0.attn.weight": torch.zeros(4, 4)}, d / "student.pt")
    return [d / "student.pt"]


def _shape_mismatch(src, d):
    sd = torch.load(src, weights_only=True)
    sd["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(512, 1000)
    torch.save(sd, d / "student.pt")
    return [d / "student.pt"]


def _nan_weights(src, d):
    sd = torch.load(src, weights_only=True)
    sd["bert.encoder.layer.1.attention.self.query.weight"][0, 0] = float("nan")
    torch.save(sd, d / "student.pt")
    return [d / "student.pt"]


def _bottleneck_too_large(src, d):
    (d / "student.pt").write_bytes(src.read_bytes())
    return [d / "student.pt", "--bottleneck", "1024"]


def _tokenizer_mismatch(src, d):
    (d / "student.pt").write_bytes(src.read_bytes())
    (d / "vocab.txt").write_text("\n".join(helpers.SPECIAL + helpers.CHARS[:50]) + "\n")
    return [d / "student.pt", "--tokenizer", d]


def _calibration_without_tokenizer(src, d):
    (d / "student.pt").write_bytes(src.read_bytes())
    (d / "calib.jsonl").write_text('{"text": "一丁七"}\n', encoding="utf-8")
    return [d / "student.pt", "--calib", d / "calib.jsonl"]


def _missing_file(src, d):
    return [d / "nope.pt"]


@pytest.mark.parametrize("make_bad", [_truncated, _corrupt_safetensors, _unknown_layout, _shape_mismatch, _nan_weights,
                                      _bottleneck_too_large, _tokenizer_mismatch, _calibration_without_tokenizer,
                                      _missing_file])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(make_bad, student_pt, tmp_path, capsys, tokenizer):
    d = tmp_path / "in"
    d.mkdir()
    if make_bad not in (_tokenizer_mismatch, _calibration_without_tokenizer):
        tokenizer.save_pretrained(str(d))
    args = make_bad(student_pt, d)
    out = tmp_path / "out"
    code, _, err = run_cli([*args, "-o", out], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("mbconvert: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_a_bare_state_dict_converts_without_tokenizer_and_says_what_the_output_lacks(student_pt, tmp_path, capsys,
                                                                                      caplog):
    """The headline command on the seeds' own input: weights only, one warning naming the flags that add the rest."""
    from transformers import AutoModelForSequenceClassification

    d = tmp_path / "in"
    d.mkdir()
    (d / "student.pt").write_bytes(student_pt.read_bytes())
    code, _, err = run_cli([d / "student.pt", "--bottleneck", "128", "-o", tmp_path / "out"], capsys)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] + \
        [line for line in err.splitlines() if "warning" in line]
    assert code == 0, err
    assert any("--tokenizer" in w and "--calib" in w for w in warnings), warnings
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    assert model.config.model_type == "mobilebert" and not (tmp_path / "out" / "tokenizer.json").exists()
    assert "no tokenizer" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")  # the card says so too
    # the weights-only output goes on through the pipeline: export needs no tokenizer without --data
    code, _, err = run_cli(["export", tmp_path / "out", "--format", "onnx", "--seq-len", "16"], capsys)
    assert code == 0 and (tmp_path / "out" / "export" / "model.onnx").is_file(), err


def test_converting_without_calibration_text_warns_with_the_flag(student_pt, tmp_path, capsys, caplog):
    code, _, err = run_cli([student_pt, "--bottleneck", "64", "-o", tmp_path / "out"], capsys)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] + err.splitlines()
    assert code == 0 and any("calibration" in w and "--calib" in w for w in warnings), warnings


def test_safetensors_written_by_us_round_trip(student_pt, tmp_path, capsys):
    sd = torch.load(student_pt, weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "s.safetensors"))
    (tmp_path / "vocab.txt").write_text((student_pt.parent / "tokenizer.json").exists() and
                                        "\n".join(helpers.SPECIAL + helpers.CHARS) + "\n")
    code, _, err = run_cli([tmp_path / "s.safetensors", "-o", tmp_path / "o", "--bottleneck", "64"], capsys)
    assert code == 0, err


def test_recover_flags_reach_the_recovery_config_and_defaults_come_from_it():
    from mbconvert.cli import _recovery_config, build_parser
    from mbconvert.config import RecoveryConfig

    def parse(*flags):
        return _recovery_config(build_parser("recover").parse_args(["out", "--source", "s.pt", "--train", "t.jsonl",
                                                                    *flags]))

    assert parse() == RecoveryConfig()
    cfg = parse("--budget", "10m", "--no-early-stop", "--mix-rows", "0.5", "--ema", "0.995", "--bf16",
                "--layerwise-share", "0", "--keep-last")
    assert (cfg.budget_s, cfg.tolerance, cfg.mix_rows, cfg.ema_decay, cfg.bf16, cfg.layerwise_share, cfg.keep) == \
        (600.0, None, 0.5, 0.995, True, 0.0, "last")


# -------------------------------------------------------------------- the help a new user reads
def test_help_lists_the_subcommands_and_shows_every_default_from_the_config(capsys):
    from mbconvert.cli import COMMANDS, build_parser
    from mbconvert.config import ConvertConfig, RecoveryConfig

    assert main([]) == 2
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in COMMANDS)
    help_text = build_parser("convert").format_help()
    assert f"(default: {ConvertConfig().bottleneck})" in help_text
    assert f"(default: {RecoveryConfig().mix_rows})" in help_text  # a zero default is shown too
    for command in COMMANDS:
        parser = build_parser(command)
        undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented, (command, undocumented)


def test_the_stated_default_output_folder_is_the_real_one(student_pt, tmp_path, capsys):
    from mbconvert.cli import build_parser

    output = next(a for a in build_parser("convert")._actions if "--output" in a.option_strings)
    assert "<source>-mobilebert beside the source" in output.help
    d = tmp_path / "in"
    d.mkdir()
    for f in student_pt.parent.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    assert run_cli([d / "student.pt", "--bottleneck", "64"], capsys)[0] == 0
    assert (d / "student-mobilebert" / "config.json").is_file()


def test_version_python_m_and_did_you_mean(capsys):
    import subprocess
    import sys

    import mbconvert

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and mbconvert.__version__ in capsys.readouterr().out
    code, _, err = run_cli(["chek", "out/"], capsys)
    assert code == 2 and "did you mean `mbconvert check`" in err
    done = subprocess.run([sys.executable, "-m", "mbconvert", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and mbconvert.__version__ in done.stdout


def test_public_functions_are_functions_even_after_their_modules_are_imported():
    """`from mbconvert import recover` once returned the submodule (shadowing the lazy attribute)."""
    import importlib

    import mbconvert

    for name, module in mbconvert._LAZY.items():
        importlib.import_module(f"mbconvert.{module}")
        assert callable(getattr(mbconvert, name)) and not isinstance(getattr(mbconvert, name), type(mbconvert)), name


def test_the_demo_recovers_for_a_fixed_number_of_steps_not_a_time_budget(monkeypatch, tmp_path):
    """A busy machine must get the demo's answer, only later: the demo's recovery length is in steps."""
    from mbconvert import demo, pipeline
    from mbconvert.cli import build_parser

    seen = {}
    monkeypatch.setattr(demo, "prepare_data", lambda *a: tmp_path)
    monkeypatch.setattr(demo, "build_tokenizer", lambda *a: None)
    monkeypatch.setattr(demo, "train_demo_student", lambda *a: tmp_path / "student")
    monkeypatch.setattr(pipeline, "convert_checkpoint", lambda *a, recovery, **k: seen.setdefault("recovery", recovery))

    class Passed:
        passed = True

    monkeypatch.setattr(pipeline, "check_checkpoint", lambda *a, **k: Passed())
    monkeypatch.setattr(pipeline, "export_checkpoint", lambda *a, **k: None)
    assert demo.run_demo(out_dir=str(tmp_path / "out")) == 0
    assert seen["recovery"].steps == demo.DEMO_STEPS and seen["recovery"].budget_s is None
    assert "--budget" not in build_parser("demo").format_help()
