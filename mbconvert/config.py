"""Every stage's options, in one place (TextBrewer-style). The CLI reads its defaults and help from here; the API
takes these dataclasses. Each one validates itself on construction and raises `ConfigError` for an impossible value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError


def option(default, help: str, **kw):
    """A dataclass field whose help text the CLI shows (`mbconvert --help`)."""
    return field(default=default, metadata={"help": help, **kw})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(name: str, value, lo=None, hi=None, *, integer=False, optional=False, lo_open=False) -> None:
    """`value` is a finite number (an int when `integer`) in [lo, hi] ((lo, hi] when lo_open); None if optional."""
    if value is None:
        _check(optional, f"{name} is required")
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    _check(ok_type and not isinstance(value, bool), f"{name} must be {kind}, not {value!r}")
    _check(math.isfinite(value), f"{name} must be finite, not {value}")
    if lo is not None:
        _check(value > lo if lo_open else value >= lo, f"{name} must be {'>' if lo_open else '≥'} {lo:g}, not {value:g}")
    if hi is not None:
        _check(value <= hi, f"{name} must be ≤ {hi:g}, not {value:g}")


def _choice(name: str, value, choices) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")


class _Config:
    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


@dataclass
class ConvertConfig(_Config):
    """How the source model is mapped into MobileBERT (mbconvert.mapping)."""

    bottleneck: int = option(128, "MobileBERT intra-block bottleneck width; smaller than the source's hidden size")
    ffn: int = option(4, "stacked FFNs per layer (num_feedforward_networks)")
    heads_out: int | None = option(None, "MobileBERT attention heads (default: bottleneck/32, at most the source's)")
    intermediate_size: int | None = option(None, "width of each stacked FFN (default: 4 × bottleneck)")
    embedding_size: int | None = option(None, "factorised word-embedding width (default: 128, at most the source's "
                                              "hidden size and vocabulary)")
    norm: str = option("no_norm", "normalisation: no_norm (MobileBERT, fast) or layer_norm (fidelity)",
                       choices=("no_norm", "layer_norm"))
    act: str = option("relu", "FFN activation: relu (MobileBERT) or gelu", choices=("relu", "gelu"))
    heads: int | None = option(None, "the source's head count when no config.json says (default hidden/64)")
    layers: int | None = option(None, "the source's depth when no config.json says (ALBERT applies one shared "
                                      "layer at every depth; other families' depth is in their weights)")
    calib_samples: int = option(256, "calibration texts used for the activation fits")
    calib_max_length: int | None = option(None, "calibration sequence length (default: the data's 99th "
                                                "percentile, at most 128)")
    ridge: float = option(1e-3, "relative ridge of the least-squares fits")
    prune_vocab: bool = option(False, "prune the word embeddings and the tokenizer to the special tokens and the "
                                      "tokens of the task's texts (--vocab-from, else --train, else --calib)")
    vocab_min_count: int = option(1, "with --prune-vocab: keep only the tokens seen at least this many times")
    vocab_size: int | None = option(None, "with --prune-vocab: keep at most this many tokens, special tokens "
                                          "included (the most frequent; ties: the lower id)")
    vocab_fill: bool = option(False, "with --prune-vocab and --vocab-size K: fill the room left up to K with the "
                                     "dropped words whose loss changes the source's prediction on them most")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        _number("bottleneck", self.bottleneck, 1, integer=True)
        _number("ffn", self.ffn, 1, 64, integer=True)
        _number("heads_out", self.heads_out, 1, integer=True, optional=True)
        _number("intermediate_size", self.intermediate_size, 1, integer=True, optional=True)
        _number("embedding_size", self.embedding_size, 1, integer=True, optional=True)
        _choice("norm", self.norm, ("no_norm", "layer_norm"))
        _choice("act", self.act, ("relu", "gelu"))
        _number("heads", self.heads, 1, integer=True, optional=True)
        _number("layers", self.layers, 1, 1024, integer=True, optional=True)
        _number("calib_samples", self.calib_samples, 1, integer=True)
        _number("calib_max_length", self.calib_max_length, 2, integer=True, optional=True)
        _number("ridge", self.ridge, 0)
        _check(isinstance(self.prune_vocab, bool), f"prune_vocab must be True or False, not {self.prune_vocab!r}")
        _number("vocab_min_count", self.vocab_min_count, 1, integer=True)
        _number("vocab_size", self.vocab_size, 1, integer=True, optional=True)
        _check(isinstance(self.vocab_fill, bool), f"vocab_fill must be True or False, not {self.vocab_fill!r}")
        _check(self.prune_vocab or (self.vocab_min_count == 1 and self.vocab_size is None and not self.vocab_fill),
               "vocab_min_count, vocab_size and vocab_fill select the tokens --prune-vocab keeps: pass --prune-vocab "
               "too")
        _check(not self.vocab_fill or self.vocab_size is not None,
               "vocab_fill fills the vocabulary up to vocab_size: pass --vocab-size K too")
        _number("seed", self.seed, 0, integer=True)


@dataclass
class RecoveryConfig(_Config):
    """The recovery recipe (mbconvert.recovery): layer-wise transfer, then logit distillation. Every field changes
    the result; how the run is executed (threads, device, progress, checkpoints) is `RunOptions`."""

    budget_s: float | None = option(None, "wall-clock budget for training, e.g. 10m (machine-dependent: prefer steps)")
    steps: int | None = option(None, "total optimiser steps, split between the stages by layerwise_share")
    epochs: float | None = option(None, "passes over the training data (default 1 when no budget/steps)")
    layerwise_share: float = option(0.3, "share of the steps/budget spent on layer-wise transfer")
    batch_size: int = option(32, "rows per training step")
    bucket_batches: int = option(50, "sort each window of this many batches by length (less padding); 1 = off")
    max_length: int | None = option(None, "sequence length (default: the data's 99th percentile)")
    lr: float = option(1e-4, "task-stage learning rate (the mapped model starts close; 5e-4 first loses accuracy)")
    layerwise_lr: float = option(1e-3, "layer-wise stage learning rate")
    lower_layer_lr_scale: float = option(0.1, "layer-wise stage: LR factor for the layers below; 0 freezes them")
    warmup_ratio: float = option(0.05, "linear warm-up share of each stage")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    temperature: float = option(3.0, "distillation temperature")
    alpha: float = option(0.5, "weight of the distillation loss; 1 − alpha goes to cross-entropy on labels")
    hidden_weight: float = option(1.0, "weight of the feature-map (hidden-state MSE) loss")
    attention_weight: float = option(1.0, "weight of the attention-transfer loss")
    attention_loss: str = option("relation_kl", "relation_kl (MiniLMv2 relations, any head counts) or "
                                                "attention_kl_mapped (per-head KL on the heads conversion kept)",
                                 choices=("relation_kl", "attention_kl_mean_heads", "attention_kl_mapped"))
    relation_heads: int = option(8, "MiniLMv2 relation heads shared by source and MobileBERT")
    mix_rows: float = option(0.0, "share of each batch's rows whose tokens are mixed and labelled live by the "
                                  "source model (augmentation for small training sets)")
    mix_tokens: float = option(0.2, "in a mixed row, the chance that each token is swapped")
    bf16: bool = option(False, "bfloat16 autocast for training steps (CPUs with AVX512-BF16/AMX, recent GPUs)")
    ema_decay: float | None = option(None, "evaluate and keep a moving average of the weights, e.g. 0.995")
    keep: str = option("best", "which weights to keep: best (dev evaluation) or last", choices=("best", "last"))
    tolerance: float | None = option(1.0, "stop once dev accuracy is within this many points of the source's "
                                          "(None, --no-early-stop: use the whole length)")
    eval_every: int = option(100, "task-stage steps between dev evaluations")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        lengths = [n for n in ("budget_s", "steps", "epochs") if getattr(self, n) is not None]
        _check(len(lengths) <= 1, f"give one of budget, steps or epochs, not {' and '.join(lengths)}")
        _number("budget_s", self.budget_s, 0, lo_open=True, optional=True)
        _number("steps", self.steps, 1, integer=True, optional=True)
        _number("epochs", self.epochs, 0, lo_open=True, optional=True)
        _number("layerwise_share", self.layerwise_share, 0, 1)
        _number("batch_size", self.batch_size, 1, integer=True)
        _number("bucket_batches", self.bucket_batches, 1, integer=True)
        _number("max_length", self.max_length, 2, integer=True, optional=True)
        for name in ("lr", "layerwise_lr", "temperature"):
            _number(name, getattr(self, name), 0, lo_open=True)
        for name in ("lower_layer_lr_scale", "warmup_ratio", "alpha", "mix_rows", "mix_tokens"):
            _number(name, getattr(self, name), 0, 1)
        for name in ("weight_decay", "hidden_weight", "attention_weight"):
            _number(name, getattr(self, name), 0)
        _choice("attention_loss", self.attention_loss, ("relation_kl", "attention_kl_mean_heads",
                                                        "attention_kl_mapped"))
        _number("relation_heads", self.relation_heads, 1, integer=True)
        _number("ema_decay", self.ema_decay, 0, 1, lo_open=True, optional=True)
        _choice("keep", self.keep, ("best", "last"))
        _number("tolerance", self.tolerance, 0, 100, optional=True)
        _number("eval_every", self.eval_every, 1, integer=True)
        _number("seed", self.seed, 0, integer=True)


@dataclass
class RunOptions(_Config):
    """How a recovery runs, not what it computes: none of these changes the weights, so they may change between an
    interrupted run and its `--resume`."""

    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")
    threads: int | None = option(None, "torch threads (default: all cores)")
    progress: bool = option(True, "progress bars on stderr")
    checkpoint_every_s: float = option(120.0, "seconds between resumable checkpoints")
    stop_after_steps: int | None = option(None, "checkpoint and stop as Ctrl-C would after this many steps (tests)")
    cache_dir: str | None = option(None, "cache for tokenised data and the source's logits (default: "
                                         "$MBCONVERT_CACHE, else ~/.cache/mbconvert; never the output folder)")
    stream: str = option("auto", "read --train/--unlabelled through memory-mapped Arrow files in the cache instead "
                                 "of memory (mbconvert.corpus; the same batches): on, off, or auto (when the files "
                                 "together exceed --stream-threshold-mb)", choices=("auto", "on", "off"))
    stream_threshold_mb: float = option(256.0, "with --stream auto: stream training data larger than this (MB)")

    def __post_init__(self):
        _number("threads", self.threads, 1, 4096, integer=True, optional=True)
        _number("checkpoint_every_s", self.checkpoint_every_s, 0, lo_open=True)
        _number("stop_after_steps", self.stop_after_steps, 1, integer=True, optional=True)
        _choice("stream", self.stream, ("auto", "on", "off"))
        _number("stream_threshold_mb", self.stream_threshold_mb, 0)


@dataclass
class CheckConfig(_Config):
    """CompatibilityTestSuite options (mbconvert.check). Accuracy tolerances are in points (1.0 = one percentage
    point, e.g. 90.0% → 89.0%)."""

    tolerance: float = option(1.0, "allowed accuracy drop of the converted model, in points")
    two_sided: bool = option(False, "also fail when the converted model is better by more than the tolerance "
                                    "(|difference| ≤ tolerance)")
    batch_size: int = option(64, "rows per forward pass when predicting")
    max_length: int | None = option(None, "sequence length (default: the data's)")
    latency_batch_sizes: tuple[int, ...] = option((1, 32), "batch sizes timed")
    latency_warmup: int = option(3, "untimed forward passes before each latency measurement")
    latency_repeats: int = option(20, "latency measurements per batch size, at least (median and IQR reported)")
    latency_min_run_s: float = option(0.2, "seconds of timed forward passes per batch size, at least")
    threads: int | None = option(None, "torch threads while measuring (default: min(2, cores); in the report)")
    similarity_samples: int = option(256, "texts used for the layer and attention similarity")

    def __post_init__(self):
        self.latency_batch_sizes = tuple(self.latency_batch_sizes)
        _number("tolerance", self.tolerance, 0, 100)
        _check(isinstance(self.two_sided, bool), f"two_sided must be True or False, not {self.two_sided!r}")
        _number("batch_size", self.batch_size, 1, integer=True)
        _number("max_length", self.max_length, 2, integer=True, optional=True)
        _check(bool(self.latency_batch_sizes), "latency_batch_sizes needs at least one batch size")
        for b in self.latency_batch_sizes:
            _number("latency_batch_sizes entry", b, 1, integer=True)
        _number("latency_warmup", self.latency_warmup, 1, integer=True)
        _number("latency_repeats", self.latency_repeats, 1, integer=True)
        _number("latency_min_run_s", self.latency_min_run_s, 0, lo_open=True)
        _number("threads", self.threads, 1, 4096, integer=True, optional=True)
        _number("similarity_samples", self.similarity_samples, 1, integer=True)


@dataclass
class ExportConfig(_Config):
    """Device export options (mbconvert.export)."""

    formats: tuple[str, ...] | None = option(None, "formats to write (default: every format whose backend is "
                                                   "installed)")
    seq_len: int | None = option(None, "fixed sequence length (default: dynamic ONNX axes / Core ML range shapes)")
    max_seq_len: int = option(512, "upper bound of Core ML's flexible sequence length")
    opset: int = option(18, "ONNX opset (the dynamo exporter writes 18 or later; torchscript 13 to 20)")
    onnx_exporter: str = option("dynamo", "how model.onnx is made: dynamo (torch.onnx.export from a torch.export "
                                          "graph; falls back to torchscript, recorded in export.json, when it fails "
                                          "or onnxscript is missing) or torchscript (the legacy tracer, deprecated "
                                          "by PyTorch)", choices=("dynamo", "torchscript"))
    coreml_source: str = option("export", "what Core ML converts: export (a torch.export ExportedProgram) or trace "
                                          "(torch.jit.trace, deprecated by PyTorch)", choices=("export", "trace"))
    onnx_graph: str = option("folded", "the ONNX graph of a NoNorm MobileBERT: folded (mbconvert.folding: NoNorms "
                                       "folded into the linear layers, one projection per input, onnxruntime's fused "
                                       "attention; the same logits, about half the operators) or plain (the "
                                       "exporter's trace of transformers' model); other models are always plain",
                             choices=("folded", "plain"))
    int8_static: bool = option(False, "static INT8 calibrated on --data instead of dynamic weight quantisation")
    onnx_ort: bool = option(False, "also save each ONNX file optimised by onnxruntime in its ORT format (model.ort, "
                                   "model.int8.ort: the graph onnxruntime runs, saved offline at the portable "
                                   "'extended' level, for onnxruntime Mobile), checked against the ONNX file")
    embedding_bits: int = option(8, "bits of the word-embedding table in model.int8.onnx: 8, or 4 (mbconvert.int4: "
                                    "block-wise 4-bit rows looked up by onnxruntime's GatherBlockQuantized, about "
                                    "0.64× the 8-bit table; onnxruntime CPU/WebGPU only)", choices=(8, 4))
    coreml_precision: str = option("fp16", "Core ML compute precision", choices=("fp16", "fp32"))
    coreml_quantize: bool = option(False, "8-bit Core ML weights (coremltools.optimize)")
    tolerance: float = option(1.0, "INT8 accuracy loss (points) that triggers a warning; with --precision mixed, "
                                   "the accuracy guard's budget")
    parity_atol: float = option(1e-4, "allowed max |logit difference| between ONNX FP32 and PyTorch")
    max_samples: int = option(512, "rows of --data used for parity, accuracy and static INT8 calibration")
    threads: int = option(2, "onnxruntime intra-op threads for the checks and latency (phone-like)")
    latency_batch_sizes: tuple[int, ...] = option((1, 32), "batch sizes timed")
    latency_repeats: int = option(20, "timed runs per measurement (median reported), after 3 warm-up runs")
    fp16_safe: str = option("auto", "rescale a NoNorm MobileBERT per channel, same function, so that its "
                                    "activations fit FP16 (mbconvert.fp16): auto (when the FP16 headroom on the "
                                    "export's rows is below --fp16-margin), on or off", choices=("auto", "on", "off"))
    fp16_margin: float = option(16.0, "FP16 headroom (65504 / peak |activation|) that --fp16-safe keeps")
    precision: str = option("default", "default, or mixed (the seeds' plan, mbconvert.mixed_precision): FFN and "
                                       "embedding weights INT8, attention FP32 (model.mixed.onnx) / FP16 (Core ML), "
                                       "with an accuracy guard on --data that keeps the most sensitive layers at "
                                       "full precision until the loss is within --tolerance",
                            choices=("default", "mixed"))
    coreml_shapes: str = option("range", "Core ML sequence length: range (1..max_seq_len) or enumerated "
                                         "(--coreml-lengths only; the Neural Engine runs enumerated shapes, range "
                                         "shapes tend to keep a model off it; needs iOS 18 / macOS 15)",
                                choices=("range", "enumerated"))
    coreml_lengths: tuple[int, ...] = option((16, 32, 64, 128), "with --coreml-shapes enumerated: the sequence "
                                                                "lengths, each capped at max_seq_len and the model's "
                                                                "positions")

    def __post_init__(self):
        if self.formats is not None:  # None: resolved by mbconvert.export.resolve_formats
            self.formats = tuple(self.formats)
            _check(bool(self.formats), "give at least one export format")
            for f in self.formats:
                _choice("format", f, EXPORT_FORMATS)
        self.latency_batch_sizes = tuple(self.latency_batch_sizes)
        _number("seq_len", self.seq_len, 1, integer=True, optional=True)
        _number("max_seq_len", self.max_seq_len, 1, integer=True)
        _number("opset", self.opset, 13, 23, integer=True)
        _choice("onnx_exporter", self.onnx_exporter, ("dynamo", "torchscript"))
        _choice("onnx_graph", self.onnx_graph, ("folded", "plain"))
        _choice("coreml_source", self.coreml_source, ("export", "trace"))
        if self.onnx_exporter == "dynamo":
            _check(self.opset >= 18, f"the dynamo ONNX exporter writes opset 18 or later, not {self.opset}: raise "
                                     "opset or use onnx_exporter torchscript")
        else:
            _check(self.opset <= 20, f"the torchscript ONNX exporter writes opset 20 at most, not {self.opset}")
        _choice("embedding_bits", self.embedding_bits, (8, 4))
        onnx_formats = self.formats is None or bool({"onnx", "onnx-int8"} & set(self.formats))
        _check(not self.onnx_ort or onnx_formats, "--onnx-ort saves the ONNX files in the ORT format: add onnx or "
                                                  "onnx-int8 to --format")
        _check(self.embedding_bits == 8 or self.formats is None or "onnx-int8" in self.formats,
               "--embedding-bits 4 changes model.int8.onnx: add onnx-int8 to --format")
        _check(not (self.embedding_bits == 4 and self.int8_static),
               "--embedding-bits 4 rewrites the dynamic INT8 file's embedding lookup: drop --int8-static")
        _choice("coreml_precision", self.coreml_precision, ("fp16", "fp32"))
        _number("tolerance", self.tolerance, 0, 100)
        _number("parity_atol", self.parity_atol, 0, lo_open=True)
        _number("max_samples", self.max_samples, 1, integer=True)
        _number("threads", self.threads, 1, 4096, integer=True)
        for b in self.latency_batch_sizes:
            _number("latency batch size", b, 1, integer=True)
        _number("latency_repeats", self.latency_repeats, 1, integer=True)
        _choice("fp16_safe", self.fp16_safe, ("auto", "on", "off"))
        _number("fp16_margin", self.fp16_margin, 1)
        _choice("precision", self.precision, ("default", "mixed"))
        _check(not (self.precision == "mixed" and self.coreml_quantize),
               "--coreml-quantize makes every Core ML weight 8-bit, --precision mixed only the FFN and embedding "
               "weights: give one of them")
        _check(not (self.precision == "mixed" and self.coreml_precision == "fp32"),
               "--precision mixed computes Core ML attention in FP16: drop --coreml-precision fp32")
        _choice("coreml_shapes", self.coreml_shapes, ("range", "enumerated"))
        self.coreml_lengths = tuple(self.coreml_lengths)
        _check(bool(self.coreml_lengths), "coreml_lengths needs at least one sequence length")
        for n in self.coreml_lengths:
            _number("coreml_lengths entry", n, 1, integer=True)
        _check(not (self.coreml_shapes == "enumerated" and self.seq_len),
               "--seq-len fixes one Core ML shape: drop it or --coreml-shapes enumerated")


EXPORT_FORMATS = ("onnx", "onnx-int8", "onnx-text", "coreml", "executorch", "executorch-int8", "litert", "litert-int8")


@dataclass
class GateConfig(_Config):
    """Regression gate options (mbconvert.gating). The tolerance is in accuracy points."""

    tolerance: float = option(0.5, "allowed accuracy drop against the baseline report, in points")
    max_latency_ratio: float | None = option(None, "fail when batch-1 latency grows beyond this factor (e.g. 1.2); "
                                                   "needs both reports measured on one machine and thread count")
    max_size_ratio: float | None = option(None, "fail when the file size grows beyond this factor")

    def __post_init__(self):
        _number("tolerance", self.tolerance, 0, 100)
        _number("max_latency_ratio", self.max_latency_ratio, 0, lo_open=True, optional=True)
        _number("max_size_ratio", self.max_size_ratio, 0, lo_open=True, optional=True)


def parse_duration(text: str | float | int | None) -> float | None:
    """'10m' → 600.0, '90s' → 90.0, '1h' → 3600.0, '45' → 45.0 (seconds); only finite positive durations."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip().lower()
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
        except ValueError:
            raise ConfigError(f"cannot read duration {text!r}: use e.g. 90s, 10m or 1h") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"a duration must be finite and positive, not {text!r}")
    return value
