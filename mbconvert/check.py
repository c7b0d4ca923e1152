"""Stage 4 — check: prove a converted model is as good as its original, on the same data, in the same run.

CompatibilityTestSuite measures both classifiers (any two with the same label set): accuracy, macro-F1,
per-class precision/recall/F1, agreement and the most frequent disagreements; latency (median and p90
after warm-up, at fixed batch sizes and the data's sequence length, with torch threads pinned); size
(parameters, safetensors bytes, peak resident memory of a forward pass); per-layer hidden-state and
head-averaged attention similarity (mbconvert.similarity.compare). The result is one JSON-able dict —
report.json — that every rendering (mbconvert.report) and the regression gate (mbconvert.gate) read.
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
import time
from pathlib import Path

import numpy as np
import torch

from .config import CheckConfig
from .data import Encoded, load_encoded
from .errors import DataError, ShapeMismatchError, TokenizerError
from .report import SCHEMA_VERSION, render_summary, write_report
from .similarity import compare, predict_logits

MEMORY_METHOD = ("peak extra resident memory of one forward pass at the largest latency batch, after warm-up: "
                 "glibc malloc_trim(0) returns freed heap pages, /proc/self/clear_refs resets VmHWM, "
                 "then VmHWM − VmRSS (Linux only; null elsewhere)")


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


class CompatibilityTestSuite:
    """Measure an original classifier and its conversion side by side (see the module docstring)."""

    def __init__(self, original, converted, test_data: Encoded, config: CheckConfig = CheckConfig(),
                 tokenizer=None, original_path=None, converted_path=None, data_path=None):
        if test_data.labels is None:
            raise DataError("the check needs labelled test data (a 'label' column)")
        if len(test_data) == 0:
            raise DataError("the test data has no rows")
        self.models = {"original": original.eval(), "converted": converted.eval()}
        self.labels = label_names(original.config, converted.config)
        self.data = test_data
        self.config = config
        self.tokenizer = tokenizer
        self.paths = {"original": original_path, "converted": converted_path, "data": data_path}

    def run(self) -> CheckResult:
        """Pin torch threads for the whole run (latency depends on them) and restore them afterwards."""
        threads = self.config.threads or min(2, os.cpu_count() or 1)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return CheckResult(self._measure(threads))
        finally:
            torch.set_num_threads(previous)

    def _measure(self, threads: int) -> dict:
        cfg, gold = self.config, self.data.labels.tolist()
        preds = {side: predict_logits(m, self.data, cfg.batch_size).argmax(-1).tolist()
                 for side, m in self.models.items()}
        seq_len = cfg.max_length or self.data.max_length
        models = {}
        for side, model in self.models.items():
            models[side] = {"class": type(model).__name__, **classification_metrics(preds[side], gold, self.labels),
                            "latency": [measure_latency(model, self.data, b, seq_len, cfg.latency_warmup,
                                                        cfg.latency_repeats) for b in cfg.latency_batch_sizes],
                            "size": model_size(model, latency_inputs(self.data, max(cfg.latency_batch_sizes), seq_len))}
        difference = models["converted"]["accuracy"] - models["original"]["accuracy"]
        within = abs(difference) <= cfg.tolerance + 1e-9  # ±tolerance inclusive, robust to float rounding
        return {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "passed": within,
            "tolerance": cfg.tolerance,
            "accuracy": {"original": models["original"]["accuracy"], "converted": models["converted"]["accuracy"],
                         "difference": difference, "within_tolerance": within},
            "agreement": sum(a == b for a, b in zip(preds["original"], preds["converted"])) / len(gold),
            "disagreements": top_disagreements(preds["original"], preds["converted"], self.labels),
            "models": models,
            "similarity": self._similarity(),
            "inputs": self._inputs(seq_len),
            "versions": versions(),
            "threads": threads,
            "memory_method": MEMORY_METHOD,
            "config": cfg.to_dict(),
        }

    def _similarity(self) -> dict:
        """Per-layer similarity on the first `similarity_samples` rows. Hidden states are compared only when
        both models have the same width (a mapped MobileBERT does); attention maps always (head-averaged)."""
        n = min(self.config.similarity_samples, len(self.data))
        d = self.data
        sample = Encoded(d.input_ids[:n], d.attention_mask[:n], d.token_type_ids[:n], d.labels[:n])
        a, b = self.models["original"], self.models["converted"]
        same_width = a.config.hidden_size == b.config.hidden_size
        c = compare(a, b, sample, batch_size=min(32, self.config.batch_size), layers=same_width)
        notes = []
        if not same_width:
            notes.append(f"hidden sizes differ ({a.config.hidden_size} vs {b.config.hidden_size}): "
                         "hidden states not compared")
        la, lb = a.config.num_hidden_layers, b.config.num_hidden_layers
        if la != lb:
            notes.append(f"layer counts differ ({la} vs {lb}): layer i is compared with layer i up to {min(la, lb)}")
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


# ----------------------------------------------------------------------------------------------- accuracy

def label_names(config_a, config_b) -> list[str]:
    """The shared label names by id; two classifiers with different label sets cannot be compared."""
    def names(c):
        return [str((c.id2label or {}).get(i, f"LABEL_{i}")) for i in range(c.num_labels)]

    a, b = names(config_a), names(config_b)
    generic = [f"LABEL_{i}" for i in range(len(a))]
    if len(a) != len(b) or (a != b and generic not in (a, b)):
        raise ShapeMismatchError(f"the models' labels differ: original {a}, converted {b}")
    return b if a == generic else a


def classification_metrics(pred: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from one confusion matrix.

    Undefined ratios (no predictions or no support for a class) count as 0. Macro-F1 averages the classes
    that occur in the gold labels or the predictions, as scikit-learn does by default.
    """
    k = len(labels)
    p, g = torch.tensor(pred), torch.tensor(gold)
    confusion = torch.bincount(g * k + p, minlength=k * k).reshape(k, k)  # rows: gold, columns: predicted
    tp, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    per_class = []
    for i, name in enumerate(labels):
        precision = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(tp[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": name, "precision": precision, "recall": recall, "f1": f1,
                          "support": int(support[i])})
    present = [c["f1"] for i, c in enumerate(per_class) if support[i] or predicted[i]]
    return {"accuracy": float(tp.sum()) / len(gold), "macro_f1": sum(present) / len(present),
            "per_class": per_class}


def top_disagreements(pred_a: list[int], pred_b: list[int], labels: list[str], k: int = 10) -> list[dict]:
    """The (original prediction → converted prediction) pairs that differ, most frequent first."""
    counts: dict[tuple[int, int], int] = {}
    for a, b in zip(pred_a, pred_b):
        if a != b:
            counts[(a, b)] = counts.get((a, b), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"original": labels[a], "converted": labels[b], "count": n} for (a, b), n in ranked]


# ----------------------------------------------------------------------------------------------- speed and size

def latency_inputs(data: Encoded, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch of real rows (repeated if the data is smaller) at a fixed width: the realistic deployed shape."""
    idx = torch.arange(batch_size) % len(data)
    return {"input_ids": data.input_ids[idx, :seq_len], "attention_mask": data.attention_mask[idx, :seq_len],
            "token_type_ids": data.token_type_ids[idx, :seq_len]}


@torch.no_grad()
def measure_latency(model, data: Encoded, batch_size: int, seq_len: int, warmup: int, repeats: int) -> dict:
    """Median and p90 wall time of a forward pass; warm-up runs absorb one-time allocation and dispatch."""
    inputs = latency_inputs(data, batch_size, seq_len)
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"batch_size": batch_size, "seq_len": seq_len, "median_ms": 1000 * median,
            "p90_ms": 1000 * float(np.percentile(times, 90)), "throughput_per_s": batch_size / median,
            "warmup": warmup, "repeats": len(times)}


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


def versions() -> dict:
    import transformers

    from . import __version__

    return {"mbconvert": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


# ----------------------------------------------------------------------------------------------- entry point

def run_check(model_path, against_path, data_path, config: CheckConfig | None = None, report_dir=None,
              tokenizer=None) -> CheckResult:
    """Load both models and the data, run the suite, write the report folder, print the summary."""
    from .load import load_classifier

    config = config or CheckConfig()
    converted, tok = load_classifier(model_path, tokenizer=tokenizer)
    original, original_tok = load_classifier(against_path, tokenizer=tokenizer)
    tok = tok or original_tok
    if tok is None:
        raise TokenizerError(f"no tokenizer found in {model_path} or beside {against_path}; pass --tokenizer DIR")
    data = load_encoded(data_path, tok, converted.config, max_length=config.max_length, require_labels=True)
    result = CompatibilityTestSuite(original, converted, data, config, tokenizer=tok, original_path=against_path,
                                    converted_path=model_path, data_path=data_path).run()
    if report_dir is None:
        model_path = Path(model_path)
        report_dir = (model_path if model_path.is_dir() else model_path.parent) / "report"
    out = write_report(result.to_dict(), report_dir)
    print(result.summary())
    print(f"report: {out / 'report.html'}")
    return result
