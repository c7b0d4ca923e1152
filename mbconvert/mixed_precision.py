"""`--precision mixed` (part of stage 5, called by mbconvert.export and mbconvert.coreml): the seeds' plan for the
device — FFN and embedding weights 8-bit, attention at full precision — with an accuracy guard.

Which weights: every Linear/Embedding of the embeddings (the tables and embedding_transformation) and of each encoder
layer outside its attention block, i.e. the stacked FFNs and the output projections (MobileBERT's output.dense and
output.bottleneck, BERT's output.dense). What stays at full precision: the attention block — query, key, value,
attention.output.dense and the bottlenecks feeding attention (MobileBERT's bottleneck.input/attention) — the
pooler and the classifier. The units the guard moves are "embeddings" and "layer.i" (one encoder layer's FFN
weights); names are module paths relative to the base model, as LogitsWrapper names them in both exported graphs
(ONNX node `/encoder/layer.0/ffn.0/intermediate/dense/MatMul`, Core ML const
`wrapper.encoder.layer.0.ffn.0.intermediate.dense.weight_to_fp16`).

- ONNX: model.mixed.onnx, onnxruntime's dynamic INT8 (per-channel weights, as model.int8.onnx) restricted to the
  chosen nodes by name; attention MatMuls stay FP32.
- Core ML: the same weights 8-bit (coremltools linear_symmetric, per channel) selected by const name, FP16 compute.

The guard, in the style of Intel Neural Compressor's accuracy criterion (there: relative 1 %; here the export's
`tolerance` in points): measure the mixed model on the export's `--data` rows; if it loses more than the tolerance
vs FP32, measure each unit's sensitivity (that unit alone quantised: KL(FP32 ‖ quantised) of the class
distributions, and accuracy) and keep the most sensitive units at full precision one at a time until the loss is
within the tolerance. ONNX trials are the real quantised files run in onnxruntime; Core ML predictions need macOS,
so its trials run the PyTorch model with the same 8-bit weight rounding simulated. Without `--data` (synthetic
rows) there is nothing to measure against: every unit is quantised and the report and a warning say so.
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import ExportConfig
from .export import Inputs, accuracy, compare, latencies, onnx_logits, size_mb, stamp_onnx, torch_logits

ATTENTION = ("attention.", "bottleneck.")  # inside an encoder layer: the attention block and what feeds it
FULL = ("attention (query, key, value, attention output, the bottlenecks feeding attention), pooler, classifier, "
        "biases and NoNorms")
PLAN_ONNX = {"int8": "FFN and embedding weights: projections INT8 per output channel, embedding tables UINT8 per "
                     "tensor (as onnxruntime quantises Gather); activations quantised at run time", "fp32": FULL}
PLAN_COREML = {"int8": "FFN and embedding weights, per output channel (linear_symmetric)", "fp16": FULL}
NO_DATA = "no --data: the accuracy guard needs labelled (or at least real) rows to measure; every unit is quantised"


# ---------------------------------------------------------------------------------------------- the plan

def weight_units(model: nn.Module) -> dict[str, list[str]]:
    """The units the guard moves → their 8-bit modules (paths relative to the base model): "embeddings" (every
    Embedding and Linear of the embeddings), then "layer.i" (layer i's Linears outside its attention block)."""
    base = model.base_model
    units = {"embeddings": [f"embeddings.{n}" for n, m in base.embeddings.named_modules()
                            if isinstance(m, (nn.Linear, nn.Embedding))]}
    for i, layer in enumerate(base.encoder.layer):
        units[f"layer.{i}"] = [f"encoder.layer.{i}.{n}" for n, m in layer.named_modules()
                               if isinstance(m, nn.Linear) and not n.startswith(ATTENTION)]
    return units


def modules_of(units: dict[str, list[str]], chosen) -> list[str]:
    return [m for u in units if u in chosen for m in units[u]]


# ---------------------------------------------------------------------------------------------- the guard

@dataclass
class Trial:
    """One candidate's logits on the export's rows and, when it is a file, its size."""

    logits: np.ndarray
    size_mb: float | None = None


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(logits)), in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def score(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    """Accuracy on the labels, else agreement with FP32's argmax (the FP32 model then scores 1)."""
    return accuracy(logits, labels) if labels is not None else float((logits.argmax(-1) == reference.argmax(-1)).mean())


def _step(trial: Trial, kept: list[str], reference: np.ndarray, labels, base: float) -> dict:
    acc = score(trial.logits, reference, labels)
    return {"kept_full_precision": list(kept), "accuracy": acc, "drop": round(100 * (base - acc), 4),
            "kl": kl_divergence(reference, trial.logits), "size_mb": trial.size_mb}


def accuracy_guard(evaluate: Callable[[list[str]], Trial], units: list[str], reference: np.ndarray,
                   labels: np.ndarray | None, tolerance: float) -> dict:
    """Quantise every unit; while the loss vs FP32 (`reference`, points) exceeds `tolerance`, measure each unit's
    sensitivity once and keep the most sensitive units (highest KL, then largest drop, then name order) at full
    precision one at a time. `evaluate(quantised units)` returns that candidate's Trial; its last call is always the
    returned candidate. Returns the guard's report: every step, the sensitivity ranking (if measured), the units kept
    and whether the loss is within."""
    base = score(reference, reference, labels)
    steps = [_step(evaluate(units), [], reference, labels, base)]
    sensitivity: list[dict] = []
    if steps[-1]["drop"] > tolerance:
        for unit in units:
            s = _step(evaluate([unit]), [], reference, labels, base)
            sensitivity.append({"unit": unit, "kl": s["kl"], "accuracy": s["accuracy"], "drop": s["drop"]})
        sensitivity.sort(key=lambda s: (-s["kl"], -s["drop"], units.index(s["unit"])))
        kept: list[str] = []
        for s in sensitivity:
            if steps[-1]["drop"] <= tolerance:
                break
            kept.append(s["unit"])
            steps.append(_step(evaluate([u for u in units if u not in kept]), kept, reference, labels, base))
    kept = steps[-1]["kept_full_precision"]
    return {"ran": True, "tolerance": tolerance, "accuracy_basis": "labels" if labels is not None else "fp32 argmax",
            "accuracy_fp32": base, "steps": steps, "sensitivity": sensitivity, "kept_full_precision": kept,
            "quantised": [u for u in units if u not in kept], "within_tolerance": steps[-1]["drop"] <= tolerance}


def run_guard(evaluate: Callable[[list[str]], Trial], units: list[str], reference: np.ndarray, inputs: Inputs,
              tolerance: float) -> tuple[dict, str | None]:
    """The guard on real rows; on synthetic rows (no --data) only the all-quantised candidate, with a warning.
    Returns (guard report, warning or None)."""
    if inputs.source == "synthetic":
        trial = evaluate(units)
        return ({"ran": False, "reason": NO_DATA, "kept_full_precision": [], "quantised": list(units),
                 "steps": [{"kept_full_precision": [], "accuracy": None, "drop": None,
                            "kl": kl_divergence(reference, trial.logits), "size_mb": trial.size_mb}]},
                f"accuracy guard not run: {NO_DATA}")
    guard = accuracy_guard(evaluate, units, reference, inputs.labels, tolerance)
    if guard["within_tolerance"]:
        return guard, None
    kept = ", ".join(guard["kept_full_precision"]) or "no unit"
    return guard, (f"the mixed model loses {guard['steps'][-1]['drop']:.2f} points vs FP32 ({guard['accuracy_basis']})"
                   f" with {kept} at full precision: more than the tolerance {tolerance:g}")


# ---------------------------------------------------------------------------------------------- ONNX

def node_module(name: str) -> str:
    """ONNX node name → the module path it came from: `/encoder/layer.0/ffn.0/output/dense/MatMul` →
    `encoder.layer.0.ffn.0.output.dense` (the legacy exporter names nodes by module scope, and
    mbconvert.export.scope_names names the dynamo exporter's alike)."""
    return ".".join(name.strip("/").split("/")[:-1])


def weight_nodes(path: Path) -> dict[str, str]:
    """Node name → module path for every node the dynamic quantiser can take (MatMul, Gemm, Gather) that reads a
    weight (an initializer)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    return {n.name: node_module(n.name) for n in graph.node
            if n.op_type in ("MatMul", "Gemm", "Gather") and weights & set(n.input)}


def quantise_nodes(prepared: Path, out: Path, nodes: dict[str, str], modules: list[str]) -> None:
    """Dynamic INT8 (per-channel weights) of exactly the nodes of `modules`; the others are excluded by name. With
    no module to quantise the FP32 file is copied (onnxruntime reads an empty node list as "every node")."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wanted = set(modules)
    chosen = [n for n, m in nodes.items() if m in wanted]
    if not chosen:
        shutil.copyfile(prepared, out)
        return
    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_quantize=chosen, nodes_to_exclude=[n for n in nodes if n not in chosen])


def export_onnx_mixed(model: nn.Module, folder: Path, inputs: Inputs, config: ExportConfig) -> dict:
    """model.mixed.onnx from the plain graph (the exporter's, whose node names say which module each weight belongs
    to; model.onnx may be the folded graph, whose projections mix modules): the guard's final candidate, with its
    parity against FP32, accuracy, size and latency. Returns export.json's `onnx-mixed` artifact."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .export import export_onnx

    fp32, out = folder / "mixed.plain.onnx", folder / "model.mixed.onnx"
    export_onnx(model, fp32, inputs, config)
    prepared, trial_path = folder / "mixed.prepared.onnx", folder / "mixed.trial.onnx"
    units = weight_units(model)
    reference = onnx_logits(fp32, inputs, config.threads)
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    nodes = weight_nodes(prepared)

    def evaluate(quantised: list[str]) -> Trial:
        quantise_nodes(prepared, trial_path, nodes, modules_of(units, quantised))
        return Trial(onnx_logits(trial_path, inputs, config.threads), size_mb(trial_path))

    try:
        guard, warning = run_guard(evaluate, list(units), reference, inputs, config.tolerance)
        trial_path.replace(out)  # the guard's last trial is its final candidate
    finally:
        prepared.unlink(missing_ok=True)
        trial_path.unlink(missing_ok=True)
    stamp_onnx(out, model)
    logits = onnx_logits(out, inputs, config.threads)
    shipped = folder / "model.onnx" if (folder / "model.onnx").is_file() else fp32  # the FP32 artifact beside it
    report = {"file": out.name, "size_mb": size_mb(out), "size_ratio": round(size_mb(out) / size_mb(shipped), 3),
              "plan": PLAN_ONNX, "int8_units": guard["quantised"], "full_precision_units": guard["kept_full_precision"],
              "int8_nodes": sum(m in set(modules_of(units, guard["quantised"])) for m in nodes.values()),
              "vs_fp32": compare(reference, logits, config.parity_atol),
              "accuracy": accuracy(logits, inputs.labels), "accuracy_fp32": accuracy(reference, inputs.labels),
              "guard": guard, "latency": latencies(out, inputs.seq_len, config)}
    fp32.unlink()  # the plain graph was only the quantiser's input
    if warning:
        report["warning"] = warning
    return report


# ---------------------------------------------------------------------------------------------- Core ML

def fake_quantise(model: nn.Module, modules: list[str]) -> nn.Module:
    """A copy of `model` whose `modules`' weights are rounded as Core ML's 8-bit linear_symmetric per output channel
    (row) rounds them: step max|row| / 127. Biases stay as they are, as in Core ML."""
    copy_ = copy.deepcopy(model)
    base = copy_.base_model
    with torch.no_grad():
        for name in modules:
            w = base.get_submodule(name).weight
            step = w.abs().amax(dim=1, keepdim=True) / 127
            step = torch.where(step > 0, step, torch.ones_like(step))
            w.copy_(torch.clamp(torch.round(w / step), -127, 127) * step)
    return copy_


def mil_name(name: str) -> str:
    """A name as the ML Program spells it: every character outside [0-9A-Za-z_] becomes `_`."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def coreml_weight_names(mlmodel, modules: list[str]) -> tuple[list[str], list[str]]:
    """The ML Program's const names of `modules`' weights — `wrapper.<module>.weight` (mbconvert.coreml converts
    LogitsWrapper under `_WithProbabilities.wrapper`) as the spec spells it, with FP16 compute's `_to_fp16` suffix —
    and the modules whose weight has no const of its own (e.g. merged with an identical one)."""
    from coremltools.optimize.coreml import get_weights_metadata

    consts = {mil_name(n.removesuffix("_to_fp16")): n for n in get_weights_metadata(mlmodel, weight_threshold=0)}
    found = {m: consts.get(mil_name(f"wrapper.{m}.weight")) for m in modules}
    return sorted(n for n in found.values() if n), [m for m, n in found.items() if n is None]


def quantise_coreml(mlmodel, names: list[str]):
    """8-bit linear_symmetric weights (per channel) for exactly the consts `names`; the others stay as they are."""
    if not names:
        return mlmodel
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    op = OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=0)
    return linear_quantize_weights(mlmodel, OptimizationConfig(op_name_configs={n: op for n in names}))


def coreml_mixed(mlmodel, model: nn.Module, inputs: Inputs, config: ExportConfig):
    """The guard on PyTorch with the 8-bit weights simulated, then those weights 8-bit in `mlmodel`. Returns
    (mlmodel, the Core ML artifact's `mixed` section, warning or None)."""
    units = weight_units(model)
    reference = torch_logits(model, inputs)

    def evaluate(quantised: list[str]) -> Trial:
        return Trial(torch_logits(fake_quantise(model, modules_of(units, quantised)), inputs))

    guard, warning = run_guard(evaluate, list(units), reference, inputs, config.tolerance)
    guard["basis"] = ("PyTorch with Core ML's 8-bit weight rounding simulated (FP32 compute): Core ML predictions "
                      "need macOS")
    names, missing = coreml_weight_names(mlmodel, modules_of(units, guard["quantised"]))
    section = {"plan": PLAN_COREML, "int8_units": guard["quantised"],
               "full_precision_units": guard["kept_full_precision"], "quantised_weights": len(names), "guard": guard}
    if missing:
        section["not_found"] = missing
        warning = "; ".join(filter(None, (warning, f"{len(missing)} weights to quantise have no const of their own "
                                                   f"in the ML Program and stay FP16: {', '.join(missing)}")))
    return quantise_coreml(mlmodel, names), section, warning
