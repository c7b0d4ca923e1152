"""Stage 4 — check: prove a converted model is as good as its source model, on the same data, in the same run.

CompatibilityTestSuite measures both classifiers — the user's *source* model and the *converted* one (any two with
the same label set): accuracy, macro-F1, per-class precision/recall/F1, agreement and the most frequent
disagreements; the accuracy difference in points with its uncertainty from the paired predictions (exact McNemar
test, paired-bootstrap 95% interval); latency (torch.utils.benchmark: median and IQR over many measurements after
warm-up, at fixed batch sizes and the data's sequence length, torch threads pinned, the machine recorded); size
(parameters, safetensors bytes, peak resident memory of a forward pass); per-layer hidden-state and head-averaged
attention similarity (eager attention is forced for the run, since sdpa returns no attention maps). The result is
one JSON-able dict — report.json — that every rendering (mbconvert.report) and the regression gate
(mbconvert.gating) read.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import datetime
import hashlib
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import CheckConfig
from .environment import versions
from .data import Encoded
from .errors import DataError, ShapeMismatchError
from .report import SCHEMA_VERSION, render_summary, write_report
from .similarity import compare, predict_logits
from .stats import classification_metrics, paired_accuracy, top_disagreements

MEMORY_METHOD = ("peak extra resident memory of one forward pass at the largest latency batch, after warm-up: "
                 "glibc malloc_trim(0) returns freed heap pages, /proc/self/clear_refs resets VmHWM, "
                 "then VmHWM − VmRSS (Linux only; null elsewhere)")
NOISY_IQR_RATIO = 0.2  # a latency whose interquartile range exceeds this share of its median is flagged noisy
LATENCY_METHOD = ("torch.utils.benchmark.Timer.blocked_autorange after `warmup` untimed passes, repeated until "
                  "`measurements` ≥ latency_repeats; each measurement is the mean of a block of passes; median and "
                  f"IQR over the measurements; noisy when IQR > {NOISY_IQR_RATIO:g} × median")


class CheckResult:
    """The suite's findings; `to_dict()` is exactly what report.json holds."""

    def __init__(self, report: dict):
        self._report = report

    @property
    def passed(self) -> bool:
        return bool(self._report["passed"])

    def to_dict(self) -> dict:
        return copy.deepcopy(self._report)

    def summary(self) -> str:
        return render_summary(self._report)

    def write_report(self, out_dir: str | os.PathLike) -> Path:
        """report.json, report.md, report.html and the plots in `out_dir` (replaced as a whole); returns it."""
        return write_report(self._report, out_dir)


class CompatibilityTestSuite:
    """Measure a source classifier and its conversion side by side (see the module docstring). `source` and
    `converted` are models (any two with the same labels); the *_path arguments are only recorded in the report."""

    def __init__(self, source, converted, test_data: Encoded, config: CheckConfig = CheckConfig(),
                 tokenizer=None, source_path=None, converted_path=None, data_path=None):
        if test_data.labels is None:
            raise DataError("the check needs labelled test data (a 'label' column)")
        if len(test_data) == 0:
            raise DataError("the test data has no rows")
        self.models = {"source": source.eval(), "converted": converted.eval()}
        self.labels = label_names(source.config, converted.config)
        self.data = test_data
        self.config = config
        self.tokenizer = tokenizer
        self.paths = {"source": source_path, "converted": converted_path, "data": data_path}

    def run(self) -> CheckResult:
        """Pin torch threads (latency depends on them) and eager attention (only eager returns attention maps) for
        the whole run, so both models are measured alike; restore both afterwards."""
        threads = self.config.threads or min(2, os.cpu_count() or 1)
        previous = torch.get_num_threads()
        attention = {side: set_attention(m, "eager") for side, m in self.models.items()}
        torch.set_num_threads(threads)
        try:
            return CheckResult(self._measure(threads))
        finally:
            torch.set_num_threads(previous)
            for side, implementation in attention.items():
                set_attention(self.models[side], implementation)

    def _measure(self, threads: int) -> dict:
        cfg, gold = self.config, self.data.labels
        preds = {side: predict_logits(m, self.data, cfg.batch_size, desc=f"check: {side} predictions").argmax(-1).cpu()
                 for side, m in self.models.items()}
        seq_len = cfg.max_length or self.data.max_length
        models = {side: self._model_report(side, preds[side].tolist(), threads, seq_len) for side in self.models}
        accuracy = paired_accuracy((preds["source"] == gold).numpy(), (preds["converted"] == gold).numpy(),
                                   cfg.tolerance, cfg.two_sided)
        return {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "passed": accuracy["within_tolerance"],
            "tolerance": cfg.tolerance,
            "two_sided": cfg.two_sided,
            "accuracy": accuracy,
            "agreement": float((preds["source"] == preds["converted"]).float().mean()),
            "disagreements": top_disagreements(preds["source"].tolist(), preds["converted"].tolist(), self.labels),
            "warnings": ([accuracy["warning"]] if accuracy["warning"] else []) + noisy_latency_warnings(models),
            "models": models,
            "similarity": self._similarity(),
            "inputs": self._inputs(seq_len),
            "versions": versions(),
            "threads": threads,
            "machine": machine(),
            "latency_method": LATENCY_METHOD,
            "memory_method": MEMORY_METHOD,
            "config": cfg.to_dict(),
        }

    def _model_report(self, side: str, pred: list[int], threads: int, seq_len: int) -> dict:
        cfg, model = self.config, self.models[side]
        latency = [measure_latency(model, self.data, b, seq_len, cfg.latency_warmup, cfg.latency_repeats, threads,
                                   cfg.latency_min_run_s)
                   for b in tqdm(cfg.latency_batch_sizes, desc=f"check: {side} latency", unit="batch size", leave=False)]
        return {"class": type(model).__name__,
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "weights_sha256": weights_sha256(model),
                **classification_metrics(pred, self.data.labels.tolist(), self.labels), "latency": latency,
                "size": model_size(model, latency_inputs(self.data, max(cfg.latency_batch_sizes), seq_len))}

    def _similarity(self) -> dict:
        """Per-layer similarity on the first `similarity_samples` rows. Hidden states are compared only when
        both models have the same width (a mapped MobileBERT does); attention maps always (head-averaged)."""
        n = min(self.config.similarity_samples, len(self.data))
        d = self.data
        sample = Encoded(d.input_ids[:n], d.attention_mask[:n], d.token_type_ids[:n], d.labels[:n])
        a, b = self.models["source"], self.models["converted"]
        same_width = a.config.hidden_size == b.config.hidden_size
        c = compare(a, b, sample, batch_size=min(32, self.config.batch_size), layers=same_width)
        notes = []
        if not same_width:
            notes.append(f"hidden sizes differ ({a.config.hidden_size} vs {b.config.hidden_size}): "
                         "hidden states not compared")
        la, lb = a.config.num_hidden_layers, b.config.num_hidden_layers
        if la != lb:
            notes.append(f"layer counts differ ({la} vs {lb}): layer i is compared with layer i up to {min(la, lb)}")
        if not c.attention_js:
            notes.append("a model returned no attention maps (no eager attention): attention not compared")
        return {"samples": n, "layer_cosine": c.layer_cosine, "layer_rel_mse": c.layer_rel_mse,
                "attention_kl": c.attention_kl, "attention_js": c.attention_js, "note": "; ".join(notes) or None}

    def _inputs(self, seq_len: int) -> dict:
        paths = {k: None if v is None else str(v) for k, v in self.paths.items()}
        data_file = Path(paths["data"]) if paths["data"] else None
        tok = self.tokenizer
        return {**paths,
                "data_sha256": file_sha256(data_file) if data_file and data_file.is_file() else None,
                "tokens_sha256": tokens_sha256(self.data), "rows": len(self.data), "seq_len": seq_len,
                "labels": self.labels,
                "tokenizer": None if tok is None else f"{type(tok).__name__} ({len(tok)} entries)"}


def set_attention(model, implementation: str | None) -> str | None:
    """Switch a transformers model's attention implementation (when it can switch); returns the previous one."""
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation != previous and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    return previous


# ----------------------------------------------------------------------------------------------- accuracy

def label_names(config_a, config_b) -> list[str]:
    """The shared label names by id; two classifiers with different label sets cannot be compared."""
    def names(c):
        return [str((c.id2label or {}).get(i, f"LABEL_{i}")) for i in range(c.num_labels)]

    a, b = names(config_a), names(config_b)
    generic = [f"LABEL_{i}" for i in range(len(a))]
    if len(a) != len(b) or (a != b and generic not in (a, b)):
        raise ShapeMismatchError(f"the models' labels differ: source {a}, converted {b}")
    return b if a == generic else a


def latency_inputs(data: Encoded, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch of real rows (repeated if the data is smaller) at a fixed width: the realistic deployed shape."""
    idx = torch.arange(batch_size) % len(data)
    return {"input_ids": data.input_ids[idx, :seq_len], "attention_mask": data.attention_mask[idx, :seq_len],
            "token_type_ids": data.token_type_ids[idx, :seq_len]}


@torch.no_grad()
def measure_latency(model, data: Encoded, batch_size: int, seq_len: int, warmup: int, repeats: int,
                    threads: int | None = None, min_run_s: float = 0.2) -> dict:
    """Forward-pass latency (see LATENCY_METHOD): `warmup` untimed passes absorb one-time allocation and dispatch,
    then blocked_autorange runs until at least `repeats` measurements and `min_run_s` seconds are collected.
    `threads`: torch threads while timing (default: the current setting)."""
    from torch.utils.benchmark import Measurement, Timer

    inputs = latency_inputs(data, batch_size, seq_len)
    timer = Timer("model(**inputs)", globals={"model": model, "inputs": inputs},
                  num_threads=threads or torch.get_num_threads(),
                  label=type(model).__name__, description=f"batch {batch_size} × {seq_len} tokens")
    timer.timeit(warmup)
    parts, count, run_s = [], 0, min_run_s
    while count < repeats:
        part = timer.blocked_autorange(min_run_time=run_s)
        parts.append(part)
        count += len(part.raw_times)
        run_s = (repeats - count) * part.number_per_run * part.median  # about the time the missing ones take
    return latency_entry(Measurement.merge(parts)[0], batch_size, seq_len, warmup)


def latency_entry(measurement, batch_size: int, seq_len: int, warmup: int) -> dict:
    """The report's latency entry from a torch.utils.benchmark Measurement (times in seconds per pass)."""
    times = np.asarray(measurement.times, dtype=np.float64)
    q1, median, q3, p90 = np.percentile(times, [25, 50, 75, 90])
    return {"batch_size": batch_size, "seq_len": seq_len, "median_ms": 1000 * median, "iqr_ms": 1000 * (q3 - q1),
            "p90_ms": 1000 * p90, "throughput_per_s": batch_size / median, "measurements": len(times),
            "noisy": bool(q3 - q1 > NOISY_IQR_RATIO * median), "warmup": warmup}


def noisy_latency_warnings(models: dict) -> list[str]:
    return [f"{side} latency at batch {x['batch_size']} is noisy (IQR {x['iqr_ms'] / x['median_ms']:.0%} of the "
            "median): other load on the machine? compare latencies with care"
            for side, m in models.items() for x in m["latency"] if x["noisy"]]


def model_size(model, inputs: dict[str, torch.Tensor]) -> dict:
    """Parameter count, bytes of the state dict as safetensors, and peak forward memory (see MEMORY_METHOD)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="mbconvert-size-") as d:
        path = Path(d) / "model.safetensors"
        save_model(model, str(path))
        file_bytes = path.stat().st_size
    return {"parameters": sum(p.numel() for p in model.parameters()), "file_bytes": file_bytes,
            "forward_peak_rss_bytes": forward_peak_rss(model, inputs)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


@torch.no_grad()
def forward_peak_rss(model, inputs: dict[str, torch.Tensor]) -> int | None:
    """Bytes of resident memory one forward pass adds at its peak, measured in this process.

    Without malloc_trim, freed heap pages from earlier passes stay resident and get reused, and the peak
    would be undercounted; clear_refs "5" resets the process high-water mark to the current RSS.
    """
    model(**inputs)  # warm-up: lazy initialisation is not part of a pass's working memory
    libc_name = ctypes.util.find_library("c")
    try:
        if libc_name:
            ctypes.CDLL(libc_name).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        out = model(**inputs)
        peak = _status_kb("VmHWM")
    except (OSError, AttributeError):  # not Linux/glibc: no portable way to read a peak of one pass
        return None
    del out
    return max(0, peak - before) * 1024


# ----------------------------------------------------------------------------------------------- provenance

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokens_sha256(data: Encoded) -> str:
    """Identifies the tokenised inputs, so two reports on different tokenisation are not compared."""
    h = hashlib.sha256()
    for t in (data.input_ids, data.attention_mask, data.token_type_ids, data.labels):
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model) -> str:
    """Identifies a model's weights (names, dtypes, shapes, values), so the gate can tell reports of other models."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def machine() -> dict:
    """What the latency was measured on; the gate refuses to compare latencies across machines."""
    return {"system": platform.system(), "architecture": platform.machine(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("model name", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

