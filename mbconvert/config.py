"""Every stage's options, in one place (TextBrewer-style). The CLI fills these; the API takes them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ConvertConfig:
    """How the student is mapped into MobileBERT (mbconvert.adapter)."""

    bottleneck: int = 128  # MobileBERT intra_bottleneck_size; must be < the student's hidden size
    ffn: int = 4  # num_feedforward_networks (stacked FFNs per layer)
    heads_out: int | None = None  # MobileBERT heads; default: bottleneck // 32 (4 heads of 32 for 128)
    intermediate_size: int | None = None  # per stacked FFN; default: 4 × bottleneck (MobileBERT's ratio)
    embedding_size: int = 128  # factorised word-embedding width
    norm: str = "no_norm"  # "no_norm" (MobileBERT) or "layer_norm" (fidelity over speed)
    act: str = "relu"  # "relu" (MobileBERT) or "gelu"
    heads: int | None = None  # the student's head count when no config says (default hidden // 64)
    calib_samples: int = 256  # calibration texts used from --calib
    calib_max_length: int | None = None  # default: from the data (99th percentile, ≤ 128)
    ridge: float = 1e-3  # relative ridge for the least-squares fits
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryConfig:
    """Layer-wise transfer then logit distillation (mbconvert.recover)."""

    budget_s: float | None = None  # wall-clock budget for both stages (e.g. --budget 10m)
    steps: int | None = None  # total optimiser steps, split between stages by layerwise_share
    epochs: float | None = None  # alternatively, passes over the training data
    layerwise_share: float = 0.3  # fraction of the steps/budget spent on the layer-wise stage
    batch_size: int = 32
    bucket_batches: int = 50  # sort each window of this many batches by length (less padding); 1 = off
    max_length: int | None = None  # default: from the data (99th percentile of token lengths)
    lr: float = 1e-4  # a fine-tuning LR: the mapped model starts close; 5e-4 first loses accuracy (benchmarks/NOTES.md)
    layerwise_lr: float = 1e-3
    lower_layer_lr_scale: float = 0.1  # layer-wise stage: LR factor for the layers below (and embeddings); 0 freezes
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    temperature: float = 3.0
    alpha: float = 0.5  # weight of the KD term; (1 - alpha) for CE on labels
    hidden_weight: float = 1.0  # feature-map transfer (MSE on layer outputs)
    attention_weight: float = 1.0  # attention transfer (relation KL, head-count independent)
    attention_loss: str = "relation_kl"  # name in mbconvert.losses.LOSSES
    relation_heads: int = 8  # MiniLMv2 relation heads shared by teacher and student
    mix_rows: float = 0.0  # task stage: share of each batch's rows whose tokens are mixed, labelled live by the teacher
    mix_tokens: float = 0.2  # in a mixed row, the chance that each token is swapped for one from another row
    bf16: bool = False  # bfloat16 autocast for training steps (CPUs with AVX512-BF16/AMX, recent GPUs); eval stays fp32
    ema_decay: float | None = None  # task stage: evaluate and keep an exponential moving average of the weights
    keep: str = "best"  # "best": the weights of the best dev evaluation; "last": the final ones (small dev sets)
    tolerance: float | None = 0.01  # stop early once dev accuracy is within this of the teacher's (None: never)
    eval_every: int = 100  # steps between evaluations in the task stage
    checkpoint_every_s: float = 120.0
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    threads: int | None = None  # torch threads (default: all cores)
    progress: bool = True  # tqdm bars on stderr
    stop_after_steps: int | None = None  # checkpoint and stop as Ctrl-C would after this many steps (tests)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckConfig:
    """CompatibilityTestSuite options (mbconvert.check)."""

    tolerance: float = 0.01  # allowed |accuracy difference| (absolute, 0.01 = 1 point)
    batch_size: int = 64
    max_length: int | None = None  # default: from the data
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_warmup: int = 3
    latency_repeats: int = 20
    threads: int | None = None  # default: min(2, cores), stated in the report
    similarity_samples: int = 256  # texts used for layer/attention similarity

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_batch_sizes"] = list(self.latency_batch_sizes)
        return d


@dataclass
class ExportConfig:
    """Device export options (mbconvert.export)."""

    formats: tuple[str, ...] = ("onnx", "onnx-int8", "coreml")
    seq_len: int | None = None  # fixed sequence length; None = dynamic (ONNX) / range shapes (Core ML)
    max_seq_len: int = 512  # upper bound of Core ML's flexible sequence length
    opset: int = 17
    int8_static: bool = False  # static INT8 with calibration data instead of dynamic weight quantisation
    coreml_precision: str = "fp16"  # "fp16" or "fp32"
    coreml_quantize: bool = False  # 8-bit weight quantisation via coremltools.optimize
    tolerance: float = 0.01  # accuracy drop that triggers a warning for INT8
    parity_atol: float = 1e-4
    max_samples: int = 512  # rows of --data used for parity, accuracy and static INT8 calibration
    threads: int = 2  # onnxruntime intra-op threads for the checks and latency (phone-like)
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 20  # timed runs per measurement (median reported), after 3 warm-up runs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = list(self.formats)
        d["latency_batch_sizes"] = list(self.latency_batch_sizes)
        return d


@dataclass
class GateConfig:
    """Regression gate options (mbconvert.gate)."""

    tolerance: float = 0.005  # allowed accuracy drop vs the baseline report
    max_latency_ratio: float | None = None  # e.g. 1.2: fail when batch-1 latency grows by >20%
    max_size_ratio: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_duration(text: str | float | int | None) -> float | None:
    """'10m' → 600.0, '90s' → 90.0, '1h' → 3600.0, '45' → 45.0 (seconds)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"cannot read duration {text!r}: use e.g. 90s, 10m or 1h") from None


__all__ = ["ConvertConfig", "RecoveryConfig", "CheckConfig", "ExportConfig", "GateConfig", "parse_duration", "field"]
