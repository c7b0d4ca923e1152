"""Stage 5 — export to the phone runtimes that also run on Linux, each checked here with its own Python runtime.

- ExecuTorch (`model.pte`, `model.int8.pte`): `torch.export` → XNNPACK delegate (the CPU path on iOS and Android),
  dynamic batch and sequence axes, int64 inputs; run with `executorch.runtime`. The 8-bit variant is ExecuTorch's
  XNNPACKQuantizer through PT2E: per-channel symmetric int8 weights, int8 activations quantised at run time.
- LiteRT (`model.tflite`, `model.int8.tflite`): litert-torch, one fixed shape [1, seq_len] (litert-torch 0.10
  cannot lower a symbolic sequence length through the position ids), int32 inputs; run with ai-edge-litert's
  Interpreter (XNNPACK delegate). The 8-bit variant is ai-edge-quantizer's dynamic_wi8_afp32 recipe on the FP32
  file: int8 weights, activations quantised at run time.

Every file is exported from mbconvert.export's `LogitsWrapper` and checked against the PyTorch logits on the
export's rows: FP32 files under `parity` (passed within `parity_atol` with identical argmax), 8-bit files under
`vs_fp32` (against PyTorch's FP32 logits) with the accuracy drop, like `onnx-int8`. Latency is the median of
`latency_repeats` runs on a full batch, with `threads` runtime threads, as for ONNX.

executorch is the `executorch` extra, litert-torch / ai-edge-litert / ai-edge-quantizer the `litert` extra; both are
imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .export import INPUT_NAMES, Inputs, LogitsWrapper, accuracy, compare, latency_feeds, median_ms, size_mb

MOBILE_FORMATS = ("executorch", "executorch-int8", "litert", "litert-int8")
FILES = {"executorch": "model.pte", "executorch-int8": "model.int8.pte", "litert": "model.tflite",
         "litert-int8": "model.int8.tflite"}
MIN_DYNAMIC_SEQ = 3  # MobileBERT's trigram embedding slices [:, 1:]: torch.export guards the length against 2
MAX_BATCH = 1024


# ---------------------------------------------------------------------------------------------- shared

def as_args(feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Contiguous int64 tensors in INPUT_NAMES order (Inputs' arrays may be column slices of wider ones: torch.export
    would guard on their strides, and the ExecuTorch runtime takes contiguous memory)."""
    return [torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=np.int64)) for name in INPUT_NAMES]


def example_args(inputs: Inputs, rows: int = 2) -> tuple[torch.Tensor, ...]:
    """The first `rows` rows (the only row repeated when there is one: torch.export specialises a dimension of
    size 1, which would fix the batch)."""
    feeds = inputs.feeds(0, rows)
    if len(inputs.input_ids) < rows:
        feeds = {k: np.repeat(v[:1], rows, axis=0) for k, v in feeds.items()}
    return tuple(as_args(feeds))


def checked(fmt: str, path: Path, logits: np.ndarray, reference: np.ndarray, inputs: Inputs, config) -> dict:
    """export.json's entry for one file: FP32 under `parity`, 8-bit under `vs_fp32` with the accuracy drop
    (points, against PyTorch's accuracy on labels, else against its argmax)."""
    entry = {"file": path.name, "size_mb": size_mb(path)}
    result = compare(reference, logits, config.parity_atol)
    acc = accuracy(logits, inputs.labels)
    if not fmt.endswith("-int8"):
        entry.update(parity=result, accuracy=acc)
        if not result["passed"]:
            entry["warning"] = f"{fmt} logits differ from PyTorch by {result['max_abs_diff']:.3g}"
        return entry
    acc32 = accuracy(reference, inputs.labels)
    drop = round(100 * (acc32 - acc if acc is not None else 1.0 - result["argmax_agreement"]), 4)
    entry.update(vs_fp32=result, accuracy=acc, accuracy_fp32=acc32, accuracy_drop=drop,
                 accuracy_basis="labels" if acc is not None else "fp32 argmax")
    if drop > config.tolerance:
        entry["warning"] = (f"{fmt} loses {drop:.2f} points of accuracy vs PyTorch FP32 ({entry['accuracy_basis']}), "
                            f"more than the tolerance {config.tolerance:g} points")
    return entry


# ---------------------------------------------------------------------------------------------- ExecuTorch

def executorch_shapes(inputs: Inputs, config, positions: int) -> dict:
    """torch.export dynamic shapes: batch 1..MAX_BATCH; sequence MIN_DYNAMIC_SEQ..max_seq_len (capped at the
    model's positions) unless --seq-len fixes it or the rows are shorter than MIN_DYNAMIC_SEQ."""
    from torch.export import Dim

    axes = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if not config.seq_len and inputs.seq_len >= MIN_DYNAMIC_SEQ:
        axes[1] = Dim("sequence", min=MIN_DYNAMIC_SEQ, max=max(inputs.seq_len, min(config.max_seq_len, positions)))
    return {name: axes for name in INPUT_NAMES}


def shape_record(shapes: dict, inputs: Inputs) -> dict:
    """The accepted [min, max] of each axis, as export.json records them."""
    axes = shapes["input_ids"]
    seq = axes.get(1)
    return {"batch": [axes[0].min, axes[0].max],
            "sequence": [seq.min, seq.max] if seq is not None else [inputs.seq_len, inputs.seq_len]}


def quantize_pt2e(module: torch.nn.Module, example: tuple, shapes: dict) -> torch.nn.Module:
    """XNNPACKQuantizer, per-channel symmetric int8 weights and dynamic int8 activations (no calibration data)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    graph = prepare_pt2e(torch.export.export(module, example, dynamic_shapes=shapes).module(), quantizer)
    graph(*example)
    return convert_pt2e(graph)


def delegation(edge) -> dict:
    """How much of the program runs in XNNPACK: node counts and the op types left to ExecuTorch's portable kernels."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    portable = sorted(op for op, b in info.delegation_by_operator.items()
                      if b.non_delegated and op not in ("getitem", "sym_size"))
    delegated = sorted(op for op, b in info.delegation_by_operator.items() if b.delegated)
    return {"delegate": "XnnpackBackend", "subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes, "non_delegated_nodes": info.num_non_delegated_nodes,
            "delegated_ops": delegated, "portable_ops": portable}


def export_executorch(model, path: Path, inputs: Inputs, config, int8: bool) -> dict:
    """Write the .pte (XNNPACK-lowered; 8-bit via quantize_pt2e when `int8`); returns its shapes and delegation."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = LogitsWrapper(model).eval()
    example = example_args(inputs)
    shapes = executorch_shapes(inputs, config, model.config.max_position_embeddings)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree LeafSpec deprecation inside exir
        if int8:
            module = quantize_pt2e(module, example, shapes)
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path.write_bytes(edge.to_executorch().buffer)
    return {"shapes": shape_record(shapes, inputs), "input_dtype": "int64", "delegation": delegation(edge)}


def executorch_method(path: str | Path, threads: int = 2):
    """The program's `forward`, loaded by ExecuTorch's runtime, its thread pool (XNNPACK's) set to `threads`."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)
    return Runtime.get().load_program(Path(path)).load_method("forward")


def executorch_logits(path: str | Path, inputs: Inputs, threads: int = 2) -> np.ndarray:
    method = executorch_method(path, threads)
    return np.concatenate([method.execute(as_args(feeds))[0].numpy() for feeds in inputs.chunks()])


def executorch_latency(path: str | Path, batch: int, seq_len: int, threads: int = 2, repeats: int = 20) -> float:
    """Median milliseconds of one ExecuTorch call on a full batch (mbconvert.export.onnx_latency's inputs)."""
    method = executorch_method(path, threads)
    args = as_args(latency_feeds(batch, seq_len))
    return median_ms(lambda: method.execute(args), repeats)


def executorch_format(fmt: str, model, folder: Path, inputs: Inputs, reference: np.ndarray, config) -> dict:
    path = folder / FILES[fmt]
    details = export_executorch(model, path, inputs, config, int8=fmt.endswith("-int8"))
    entry = checked(fmt, path, executorch_logits(path, inputs, config.threads), reference, inputs, config)
    entry.update(details, runtime="executorch.runtime", threads=config.threads,
                 latency={f"batch{b}_ms": executorch_latency(path, b, inputs.seq_len, config.threads,
                                                             config.latency_repeats)
                          for b in config.latency_batch_sizes})
    if fmt.endswith("-int8"):
        entry["quantization"] = "XNNPACKQuantizer: per-channel symmetric int8 weights, dynamic int8 activations"
    return entry


# ---------------------------------------------------------------------------------------------- LiteRT

@contextlib.contextmanager
def quiet_litert():
    """Without litert-torch's progress lines, ai-edge-quantizer's prints and torch's pytree deprecation warnings
    (the progress setting is restored afterwards)."""
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous


def export_litert(model, path: Path, seq_len: int) -> None:
    """The FP32 .tflite: signature `serving_default`, inputs named as INPUT_NAMES, int32, shape [1, seq_len]."""
    import litert_torch

    sample = dict(zip(INPUT_NAMES, as_args(latency_feeds(1, seq_len))))  # three distinct tensors: torch.export
    # would read one tensor passed twice as one input
    with torch.no_grad(), quiet_litert():
        litert_torch.convert(LogitsWrapper(model).eval(), sample_kwargs=sample).export(str(path))


def quantize_litert(fp32: Path, out: Path) -> None:
    """ai-edge-quantizer's dynamic_wi8_afp32: int8 weights, activations quantised at run time."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    with quiet_litert():
        q.quantize().export_model(str(out), overwrite=True)


def litert_runner(path: str | Path, threads: int = 2):
    """ai-edge-litert's signature runner for `serving_default` (XNNPACK delegate, `threads` threads)."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads).get_signature_runner()


def litert_call(runner, feeds: dict[str, np.ndarray]) -> np.ndarray:
    out = runner(**{name: feeds[name].astype(np.int32) for name in INPUT_NAMES})
    return next(iter(out.values()))


def litert_logits(path: str | Path, inputs: Inputs, threads: int = 2) -> np.ndarray:
    """Row by row: the file's one shape is [1, seq_len]."""
    runner = litert_runner(path, threads)
    return np.concatenate([litert_call(runner, inputs.feeds(i, i + 1)) for i in range(len(inputs.input_ids))])


def litert_latency(path: str | Path, seq_len: int, threads: int = 2, repeats: int = 20) -> float:
    """Median milliseconds of one LiteRT call at batch 1 (its only batch size)."""
    runner = litert_runner(path, threads)
    feeds = latency_feeds(1, seq_len)
    return median_ms(lambda: litert_call(runner, feeds), repeats)


def litert_format(fmt: str, model, folder: Path, inputs: Inputs, reference: np.ndarray, config) -> dict:
    """litert-int8 quantises model.tflite, written first (and removed again) when litert itself is not asked for."""
    path, fp32 = folder / FILES[fmt], folder / FILES["litert"]
    if not fp32.exists():
        export_litert(model, fp32, inputs.seq_len)
    if fmt == "litert-int8":
        quantize_litert(fp32, path)
        if "litert" not in config.formats:
            fp32.unlink()
    entry = checked(fmt, path, litert_logits(path, inputs, config.threads), reference, inputs, config)
    entry.update(shapes={"batch": [1, 1], "sequence": [inputs.seq_len, inputs.seq_len]}, input_dtype="int32",
                 runtime="ai_edge_litert.interpreter", threads=config.threads,
                 latency={"batch1_ms": litert_latency(path, inputs.seq_len, config.threads, config.latency_repeats)})
    if fmt == "litert-int8":
        entry["quantization"] = "ai-edge-quantizer dynamic_wi8_afp32: int8 weights, dynamic int8 activations"
    return entry


# ---------------------------------------------------------------------------------------------- main

def export_mobile_formats(model, folder: Path, inputs: Inputs, reference: np.ndarray, config) -> dict:
    """Every format of MOBILE_FORMATS in `config.formats`, in that order: export.json's artifact entries."""
    out = {}
    for fmt in MOBILE_FORMATS:
        if fmt in config.formats:
            run = executorch_format if fmt.startswith("executorch") else litert_format
            out[fmt] = run(fmt, model, folder, inputs, reference, config)
    return out
