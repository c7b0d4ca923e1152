"""Core ML export (part of stage 5, see mbconvert.export): a classifier ML Program (classLabel, a class → probability
dictionary, and the raw logits) with FP16 compute unless the model would overflow FP16, batch 1 and a flexible or
fixed sequence length, described for Xcode (author, version, inputs, outputs, labels); then what Linux can check of
it (the spec) and, on macOS only, prediction parity with PyTorch.

coremltools is optional and imported inside the functions that need it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ExportConfig
from .export import INPUT_NAMES, LEAFSPEC_WARNING, Inputs, LogitsWrapper, compare, example_batch, id2label, size_mb
from .numerics import FP16_MAX, activation_peaks
FP16_MASK_VALUE = -3.0e4  # large enough to zero a softmax term, small enough not to overflow FP16
EXPORTED_WEIGHT = "p_wrapper_"  # torch.export's name of _WithProbabilities.wrapper's parameters; traced: "wrapper_"


@torch.no_grad()
def _all_finite(wrapper: LogitsWrapper, feeds: list[torch.Tensor]) -> bool:
    """Is every submodule's floating-point output finite (no inf/NaN)?"""
    finite = True

    def hook(_module, _inp, out):
        nonlocal finite
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            finite = finite and bool(torch.isfinite(out).all())

    handles = [m.register_forward_hook(hook) for m in wrapper.modules()]
    try:
        wrapper.eval()(*feeds)
    finally:
        for h in handles:
            h.remove()
    return finite


def fp16_check(model: nn.Module, inputs: Inputs, activations: dict | None = None) -> dict:
    """Does the model survive FP16? Peak |activation| in FP32 over real tokens vs 65504
    (mbconvert.numerics.activation_peaks; pass `activations` if already measured on `inputs`), and a real FP16 run
    for inf/NaN.

    The peak catches overflows that tanh/softmax would hide; the FP16 run catches ones inside attention.
    """
    activations = activations or activation_peaks(model, inputs.encoded())
    feeds = [torch.from_numpy(v) for v in inputs.feeds().values()]
    finite = _all_finite(LogitsWrapper(copy.deepcopy(model).half(), FP16_MASK_VALUE), feeds)
    peak = activations["peak"]
    return {"peak_abs_activation": peak, "module": activations["module"], "fp16_finite": finite,
            "ok": peak < FP16_MAX and finite}


class _WithProbabilities(nn.Module):
    """(logits, softmax(logits)): the probabilities feed Core ML's classifier outputs, the logits stay an output."""

    def __init__(self, wrapper: LogitsWrapper):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, input_ids, attention_mask, token_type_ids):
        logits = self.wrapper(input_ids, attention_mask, token_type_ids)
        return logits, torch.softmax(logits, dim=-1)


def sequence_lengths(config: ExportConfig, max_positions: int) -> list[int]:
    """--coreml-shapes enumerated: the lengths, each capped at max_seq_len and the model's positions, sorted."""
    cap = min(config.max_seq_len, max_positions)
    return sorted({min(n, cap) for n in config.coreml_lengths})


def sequence_shape(config: ExportConfig, inputs: Inputs, max_positions: int):
    """The inputs' shape: (1, seq_len) when fixed; else ct.EnumeratedShapes of (1, n) for each enumerated length
    (the default: the shortest that holds the export's rows), else (1, RangeDim(1, max))."""
    import coremltools as ct

    max_len = min(config.max_seq_len, max_positions)
    if config.seq_len:
        return (1, config.seq_len)
    if config.coreml_shapes == "enumerated":
        lengths = sequence_lengths(config, max_positions)
        default = next((n for n in lengths if n >= inputs.seq_len), lengths[-1])
        return ct.EnumeratedShapes(shapes=[(1, n) for n in lengths], default=(1, default))
    return (1, ct.RangeDim(1, max_len, default=min(inputs.seq_len, max_len)))


def deployment_target(config: ExportConfig):
    """iOS 18 for enumerated shapes (an ML Program with several enumerated inputs needs it), iOS 16 for 8-bit
    weights (constexpr ops), else iOS 15."""
    import coremltools as ct

    if config.coreml_shapes == "enumerated" and not config.seq_len:
        return ct.target.iOS18
    return ct.target.iOS16 if config.coreml_quantize or config.precision == "mixed" else ct.target.iOS15


def torch_program(wrapper: nn.Module, inputs: Inputs, config: ExportConfig):
    """What ct.convert reads, one row of batch 1 as the example (Core ML inputs are batch 1): --coreml-source export,
    a torch.export ExportedProgram in the ATEN dialect (run_decompositions({}), which coremltools asks for), its
    sequence axis Dim.DYNAMIC unless --seq-len (a named Dim would fail on MobileBERT's guards against lengths 1 and 2,
    which only choose strides and matmul folding: the converted ops hold for every length, and sequence_shape's range
    or enumerated lengths replace the program's); --coreml-source trace, torch.jit.trace, deprecated by PyTorch."""
    example = example_batch(inputs, 1, not config.seq_len)
    if config.coreml_source == "trace":
        return torch.jit.trace(wrapper, example)
    shapes = None if config.seq_len else {name: {1: torch.export.Dim.DYNAMIC} for name in INPUT_NAMES}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", LEAFSPEC_WARNING, FutureWarning)
        return torch.export.export(wrapper, example, dynamic_shapes=shapes).run_decompositions({})


def _convert(source, inputs: Inputs, config: ExportConfig, use_fp16: bool, max_positions: int, labels: list[str]):
    """A classifier ML Program: int32 inputs of batch 1 and a fixed, flexible (range) or enumerated sequence length
    (one shape object shared by the three inputs: one length); outputs classLabel, classLabel_probs
    (name → probability) and logits.

    Two steps because coremltools 9.0's ClassifierConfig cannot both keep `logits` and pick the probabilities by
    name in one ct.convert: given output names, its exporter indexes past them once classify replaces one
    (IndexError); without them, the classifier takes whichever op comes last (after FP16's output casts: the logits).
    So the torch model becomes a MIL program with named outputs, whose output types are then dropped (and its weights
    renamed as traced: mbconvert.mixed_precision picks them by name).
    """
    import coremltools as ct

    shape, target = sequence_shape(config, inputs, max_positions), deployment_target(config)
    program = ct.convert(
        source, convert_to="milinternal",
        inputs=[ct.TensorType(name=name, shape=shape, dtype=np.int32) for name in INPUT_NAMES],
        outputs=[ct.TensorType(name="logits"), ct.TensorType(name="probabilities")],
        compute_precision=ct.precision.FLOAT16 if use_fp16 else ct.precision.FLOAT32, minimum_deployment_target=target)
    program.functions["main"].set_output_types(None)
    for op in program.functions["main"].operations:  # weights named as traced: the names read alike from both sources
        if op.op_type == "const" and op.name.startswith(EXPORTED_WEIGHT):
            op.name, op.outputs[0].name = (n.removeprefix("p_") for n in (op.name, op.outputs[0].name))
    return ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,  # already cast
                      classifier_config=ct.ClassifierConfig(labels, predicted_probabilities_output="probabilities"),
                      minimum_deployment_target=target)


def describe(mlmodel, model: nn.Module, labels: list[str]) -> None:
    """What Xcode and an app show: descriptions of the model, its inputs and outputs; author, version, labels."""
    mlmodel.short_description = (f"{type(model).__name__} text classifier ({len(labels)} classes: "
                                 f"{', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}), converted by mbconvert")
    mlmodel.author, mlmodel.version = "mbconvert", __version__
    mlmodel.input_description["input_ids"] = "token ids from the tokenizer in this folder (tokenizer.json/vocab.txt)"
    mlmodel.input_description["attention_mask"] = "1 for real tokens, 0 for padding"
    mlmodel.input_description["token_type_ids"] = "segment ids (0 for a single text)"
    mlmodel.output_description["classLabel"] = "the most probable class"
    mlmodel.output_description["classLabel_probs"] = "class name → probability (softmax of the logits)"
    mlmodel.output_description["logits"] = "raw scores by class id (config.json id2label)"
    mlmodel.user_defined_metadata["id2label"] = json.dumps(id2label(model), ensure_ascii=False)


def describe_shapes(mlmodel, config: ExportConfig, max_positions: int) -> str:
    """Say in the spec which sequence lengths the inputs take (metadata `sequence_lengths` and each input's
    description): "fixed: 32", "range: 1-512" or "enumerated: 16,32,64,128". Returns that text."""
    if config.seq_len:
        text = f"fixed: {config.seq_len}"
    elif config.coreml_shapes == "enumerated":
        text = "enumerated: " + ",".join(map(str, sequence_lengths(config, max_positions)))
    else:
        text = f"range: 1-{min(config.max_seq_len, max_positions)}"
    mlmodel.user_defined_metadata["sequence_lengths"] = text
    for name in INPUT_NAMES:
        mlmodel.input_description[name] += f"; sequence length {text}" + (
            " (pad to the next)" if text.startswith("enumerated") else "")
    return text


def export_coreml(model: nn.Module, path: Path, inputs: Inputs, config: ExportConfig,
                  activations: dict | None = None) -> dict:
    """ML Program with FP16 compute unless the model overflows FP16; batch 1, flexible or fixed length.
    `activations`: activation_peaks on `inputs`, if export_model measured them already."""
    report: dict = {}
    use_fp16 = config.coreml_precision == "fp16"
    if use_fp16:
        report["fp16_check"] = check = fp16_check(model, inputs, activations)
        if not check["ok"]:
            use_fp16 = False
            report["warning"] = (
                f"FP16 would overflow (peak |activation| {check['peak_abs_activation']:.3g} vs {FP16_MAX:g}, "
                f"finite in FP16: {check['fp16_finite']}): Core ML model exported with FP32 compute precision")
    wrapper = _WithProbabilities(LogitsWrapper(model, FP16_MASK_VALUE if use_fp16 else
                                               torch.finfo(torch.float32).min)).eval()
    labels = list(id2label(model).values())
    # coremltools' numpy warnings are benign here: a cast overflow in its range analysis, and 0/0 scales for
    # all-zero weight rows (the padding embedding) that dequantise to exactly 0 anyway
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # coremltools 9.0's ExportedProgram reader calls its own deprecated op registry lookup for every node
        warnings.filterwarnings("ignore", r"Function _TORCH_OPS_REGISTRY\.__contains__ is deprecated",
                                DeprecationWarning)
        source = torch_program(wrapper, inputs, config)
        mlmodel = _convert(source, inputs, config, use_fp16, model.config.max_position_embeddings, labels)
        if config.coreml_quantize:
            from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OptimizationConfig,
                                                     linear_quantize_weights)

            mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(
                global_config=OpLinearQuantizerConfig(mode="linear_symmetric")))
        if config.precision == "mixed":
            from .mixed_precision import coreml_mixed

            mlmodel, report["mixed"], warning = coreml_mixed(mlmodel, model, inputs, config)
            if warning:
                report["warning"] = "; ".join(filter(None, (report.get("warning"), f"mixed precision: {warning}")))
    describe(mlmodel, model, labels)
    shapes = describe_shapes(mlmodel, config, model.config.max_position_embeddings)
    mlmodel.save(str(path))
    # weights_8bit: all of them; --precision mixed: see report["mixed"]
    report.update(source=config.coreml_source, precision="fp16" if use_fp16 else "fp32",
                  weights_8bit=config.coreml_quantize, sequence_lengths=shapes)
    return report


def inspect_coreml(path: Path) -> dict:
    """What Linux can check: the spec loads; input/output names and shapes; MIL op count; weight bytes."""
    import coremltools as ct

    ct.models.MLModel(str(path), skip_model_load=True)
    spec = ct.utils.load_spec(str(path))

    def feature(f) -> dict:
        arr = f.type.multiArrayType
        ranges = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        enumerated = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        return {"name": f.name, "type": f.type.WhichOneof("Type"), "shape": list(arr.shape), "ranges": ranges or None,
                **({"enumerated": enumerated} if enumerated else {})}

    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return {"inputs": [feature(f) for f in spec.description.input],
            "outputs": [feature(f) for f in spec.description.output],
            "classifier": {"label": spec.description.predictedFeatureName,
                           "probabilities": spec.description.predictedProbabilitiesName},
            "mil_ops": sum(len(b.operations) for b in blocks),
            "weights_mb": size_mb(weights) if weights.exists() else 0.0,
            "spec_version": spec.specificationVersion}


def padded(inputs: Inputs, width: int) -> Inputs:
    """The rows padded with zeros (attention mask 0: the same logits) to `width` tokens, an enumerated length."""
    pad = [(0, 0), (0, width - inputs.seq_len)]
    return dataclasses.replace(inputs, **{name: np.pad(getattr(inputs, name), pad) for name in INPUT_NAMES})


def prediction_inputs(inputs: Inputs, config: ExportConfig, max_positions: int) -> Inputs | None:
    """The rows as the package takes them: padded to the shortest enumerated length that holds them (None: they are
    longer than every enumerated length), else as they are."""
    if config.coreml_shapes != "enumerated" or config.seq_len:
        return inputs
    width = next((n for n in sequence_lengths(config, max_positions) if n >= inputs.seq_len), None)
    return None if width is None else padded(inputs, width)


def coreml_logits(path: Path, inputs: Inputs) -> np.ndarray:
    """Predictions one row at a time (the package takes batch 1); only possible on macOS."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(path))
    rows = [mlmodel.predict({k: v.astype(np.int32) for k, v in inputs.feeds(i, i + 1).items()})["logits"]
            for i in range(len(inputs.input_ids))]
    return np.concatenate([np.asarray(r).reshape(1, -1) for r in rows])


def export_coreml_format(model, tmp: Path, inputs: Inputs, reference: np.ndarray, config: ExportConfig,
                         activations: dict | None = None) -> dict:
    path = tmp / "model.mlpackage"
    report = export_coreml(model, path, inputs, config, activations)
    report.update(file=path.name, size_mb=size_mb(path), spec=inspect_coreml(path))
    feeds = prediction_inputs(inputs, config, model.config.max_position_embeddings)
    if platform.system() == "Darwin" and feeds is not None:
        exact = report["precision"] == "fp32" and not config.coreml_quantize and config.precision != "mixed"
        atol = config.parity_atol if exact else 1e-2 * float(np.abs(reference).max())  # FP16/8-bit: 1% of range
        report["parity"] = compare(reference, coreml_logits(path, feeds), atol)
    elif platform.system() == "Darwin":
        report["parity"] = None
        report["note"] = (f"the rows ({inputs.seq_len} tokens) are longer than every enumerated length "
                          f"({report['sequence_lengths']}): prediction parity was not measured")
    else:
        report["parity"] = None
        report["note"] = (f"Core ML predictions need macOS (this is {platform.system()}): the package was "
                          "validated by its spec only, prediction parity was not measured")
    return report
