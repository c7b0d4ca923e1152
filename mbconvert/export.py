"""Stage 5 — export: ONNX (FP32 and INT8) and Core ML artifacts, each checked against the PyTorch model.
This module holds the shared parts and ONNX; Core ML is in mbconvert.coreml, ExecuTorch and LiteRT in
mbconvert.mobile_runtimes.

Every format is exported from `LogitsWrapper`, a thin module `(input_ids, attention_mask, token_type_ids) ->
logits` that calls the model's own submodules but builds the 4-D additive attention mask itself:
transformers' mask utilities (`create_bidirectional_mask`) trace into ops such as `new_ones` that
coremltools cannot convert, and data-dependent branches that the ONNX tracer would freeze.

onnx, onnxruntime and coremltools are optional (`pip install 'mbconvert[export]'`), and so are executorch
(`mbconvert[executorch]`) and litert-torch (`mbconvert[litert]`); they are imported inside the functions that need
them so that the rest of mbconvert works without them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import json
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import EXPORT_FORMATS, ExportConfig
from .data import Encoded
from .environment import versions
from .errors import ConfigError, MissingDependencyError, TokenizerError
from .numerics import activation_peaks

log = logging.getLogger("mbconvert")
SCHEMA_VERSION = 1
FORMATS = EXPORT_FORMATS
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SYNTHETIC_BATCH, SYNTHETIC_LEN = 8, 128
NEEDS = {"onnx": ("onnx", "onnxruntime"), "onnx-int8": ("onnx", "onnxruntime"),
         "onnx-text": ("onnx", "onnxruntime", "onnxruntime_extensions"), "coreml": ("coremltools",),
         "executorch": ("executorch",), "executorch-int8": ("executorch",),
         "litert": ("litert_torch", "ai_edge_litert"),
         "litert-int8": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")}
# pip install 'mbconvert[X]'
EXTRAS = {"onnx": "export", "onnx-int8": "export", "onnx-text": "export", "coreml": "export",
          "executorch": "executorch", "executorch-int8": "executorch", "litert": "litert", "litert-int8": "litert"}
# their versions go into export.json
BACKENDS = ("onnx", "onnxruntime", "onnxruntime_extensions", "onnxscript", "coremltools", "executorch", "litert_torch",
            "ai_edge_litert", "ai_edge_quantizer")


class LogitsWrapper(nn.Module):
    """BERT/MobileBERT classifier as a pure function of three integer tensors, for tracing.

    Positions are 0..n-1 in every row, as transformers numbers them for BERT and MobileBERT.
    `mask_value` is what masked positions add to the attention scores: float32's minimum reproduces
    transformers exactly; FP16 Core ML needs a value that stays finite once cast to half precision
    (mbconvert.coreml.FP16_MASK_VALUE).
    """

    def __init__(self, model: nn.Module, mask_value: float = torch.finfo(torch.float32).min):
        super().__init__()
        base = model.base_model
        if getattr(base, "pooler", None) is None or not isinstance(getattr(model, "classifier", None), nn.Linear):
            raise ConfigError(f"cannot export {type(model).__name__}: expected a BERT/MobileBERT sequence classifier "
                              "with a pooler and a linear classifier")
        self.embeddings, self.encoder, self.pooler = base.embeddings, base.encoder, base.pooler
        self.classifier = model.classifier
        self.mask_value = mask_value

    def forward(self, input_ids, attention_mask, token_type_ids):
        # positions from a cumsum, not from slicing a buffer by the traced sequence length: coremltools cannot
        # convert BERT's `seq_length + past_key_values_length` slice bound
        position_ids = torch.ones_like(input_ids).cumsum(1) - 1
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * self.mask_value
        hidden = self.encoder(hidden, attention_mask=mask)[0]
        return self.classifier(self.pooler(hidden))


@dataclass
class Inputs:
    """Token ids for parity/accuracy checks (int64 numpy, padded to one width) and labels if known."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray | None
    source: str

    def feeds(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        return {name: getattr(self, name)[start:stop] for name in INPUT_NAMES}

    def chunks(self, size: int = 32):
        for start in range(0, len(self.input_ids), size):
            yield self.feeds(start, start + size)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def encoded(self) -> Encoded:
        """The rows as `Encoded` tensors (what mbconvert.numerics.activation_peaks reads)."""
        return Encoded(*(torch.from_numpy(getattr(self, name)) for name in INPUT_NAMES), None)


def require(*modules: str, extra: str = "export") -> None:
    """Import optional modules now, so a missing extra fails before any work, with the fix in the message."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingDependencyError(f"{name} is not installed; export needs the optional extra: "
                                         f"pip install 'mbconvert[{extra}]'") from None


def sample_inputs(model, data: Encoded | None, config: ExportConfig, source: str | None = None) -> Inputs:
    """Rows of tokenised `data` (at most config.max_samples), or a deterministic synthetic padded batch."""
    if data is not None:
        enc = data
        rows = slice(0, config.max_samples)
        mask = enc.attention_mask[rows]
        width = config.seq_len or int(mask.sum(1).max())  # fixed, or the longest row's length
        ids, mask, types = (t[rows, :width].numpy().astype(np.int64)
                            for t in (enc.input_ids, enc.attention_mask, enc.token_type_ids))
        labels = enc.labels[rows].numpy() if enc.labels is not None else None
        return Inputs(ids, mask, types, labels, source or "data")
    n, width = SYNTHETIC_BATCH, config.seq_len or SYNTHETIC_LEN
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (n, width), generator=g)
    lengths = torch.linspace(width, max(2, width // 4), n).long()  # row 0 unpadded, the rest padded
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask + (model.config.pad_token_id or 0) * (1 - mask)
    return Inputs(ids.numpy(), mask.numpy(), np.zeros_like(ids.numpy()), None, "synthetic")


@torch.no_grad()
def torch_logits(model: nn.Module, inputs: Inputs) -> np.ndarray:
    return np.concatenate([model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.float().numpy()
                           for f in inputs.chunks()])


def compare(reference: np.ndarray, logits: np.ndarray, atol: float) -> dict:
    """Max |logit difference| and argmax agreement; `passed` needs both within tolerance and identical argmax."""
    diff = float(np.abs(reference - logits).max())
    agreement = float((reference.argmax(-1) == logits.argmax(-1)).mean())
    return {"max_abs_diff": diff, "argmax_agreement": agreement, "passed": diff <= atol and agreement == 1.0,
            "samples": int(len(reference))}


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(-1) == labels).mean())


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


# ---------------------------------------------------------------------------------------------- ONNX

# torch's own run_decompositions deep-copies torch.export's LeafSpec, which torch 2.13 itself deprecates: library noise
# on every torch.export path, not a deprecated call of ours (mbconvert.coreml filters it too)
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
EXAMPLE_MIN_LEN = 8  # torch.export fixes an axis whose example is 1 long, and guards MobileBERT's against 2


def example_batch(inputs: Inputs, rows: int, dynamic_seq: bool) -> tuple[torch.Tensor, ...]:
    """The first `rows` rows as contiguous int64 tensors (torch.export guards strides), in INPUT_NAMES order; with a
    dynamic sequence axis padded (attention mask 0: the same logits) to at least EXAMPLE_MIN_LEN tokens."""
    feeds = inputs.feeds(0, rows)
    pad = max(0, EXAMPLE_MIN_LEN - inputs.seq_len) if dynamic_seq else 0
    return tuple(torch.from_numpy(np.ascontiguousarray(np.pad(feeds[name], [(0, 0), (0, pad)]), dtype=np.int64))
                 for name in INPUT_NAMES)


def scope_names(proto) -> None:
    """Name the nodes of a dynamo graph as the legacy exporter does, by module scope and op —
    `/encoder/layer.0/ffn.0/intermediate/dense/MatMul`, `_1`, `_2` ... for repeats — from the scopes torch.onnx
    records in each node's metadata (`pkg.torch.onnx.name_scopes`, outermost first), then drop that metadata: both
    exporters' files read alike (mbconvert.mixed_precision picks nodes by these names; onnxruntime's profiler
    reports them), and the metadata's stack traces would ship this machine's paths (~100 KB a layer). Nodes without
    scopes keep their names."""
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        scopes = next((m.value for m in node.metadata_props if m.key == "pkg.torch.onnx.name_scopes"), None)
        del node.metadata_props[:]
        if scopes is None:
            continue
        paths = [s for s in ast.literal_eval(scopes)[:-1] if s]  # the last one is the op's own name
        parts = [b[len(a) + 1:] if a else b for a, b in zip([""] + paths, paths)]
        name = "/" + "/".join(parts + [node.op_type])
        seen[name] = seen.get(name, -1) + 1
        node.name = name if not seen[name] else f"{name}_{seen[name]}"


def _export_dynamo(wrapper: nn.Module, example: tuple, path: Path, config: ExportConfig) -> None:
    """torch.onnx.export(dynamo=True): torch.export captures the graph, onnxscript translates and optimises it. Axis
    names in `dynamic_shapes` are torch.onnx's spelling of torch.export.Dim.DYNAMIC, named so in the file: a named
    Dim would fail on MobileBERT's length guards (see EXAMPLE_MIN_LEN). Weights inside the file (external_data=False);
    nodes named by module scope (scope_names)."""
    import onnx

    seq_axis = {} if config.seq_len else {1: "sequence"}
    shapes = {name: {0: "batch", **seq_axis} for name in INPUT_NAMES}
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "torchvision ..."
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", LEAFSPEC_WARNING, FutureWarning)
        # the three inputs share their axes: torch.onnx names them once and says so for the others
        warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
        torch.onnx.export(wrapper, example, str(path), input_names=list(INPUT_NAMES), output_names=["logits"],
                          opset_version=config.opset, dynamo=True, external_data=False, dynamic_shapes=shapes,
                          verbose=False)
    proto = onnx.load(str(path))
    scope_names(proto)
    onnx.save(proto, str(path))


def _export_torchscript(wrapper: nn.Module, example: tuple, path: Path, opset: int, dynamic_seq: bool) -> None:
    """The legacy TorchScript exporter (dynamo=False), deprecated by PyTorch: --onnx-exporter torchscript, and the
    fallback when the dynamo exporter fails."""
    seq_axis = {1: "sequence"} if dynamic_seq else {}
    axes = {name: {0: "batch", **seq_axis} for name in INPUT_NAMES} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():  # "Constant folding - Only steps=1 ..." is harmless tracer noise
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(wrapper, example, str(path), input_names=list(INPUT_NAMES), output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def export_onnx(model: nn.Module, path: Path, inputs: Inputs, config: ExportConfig) -> dict:
    """One self-contained model.onnx with a dynamic batch axis (and sequence axis unless --seq-len), checked by
    onnx.checker. `config.onnx_exporter` picks the exporter; dynamo falls back to torchscript when onnxscript is
    missing or the exporter raises its own error (torch.onnx.errors.OnnxExporterError: capture or translation
    failed). Returns export.json's record: {"exporter": the one used, "opset": the file's, "exporter_fallback": why,
    only after a fallback (export_onnx_formats turns it into the artifact's warning)}."""
    import onnx

    wrapper, dynamic_seq = LogitsWrapper(model).eval(), not config.seq_len
    example = example_batch(inputs, 2, dynamic_seq)
    record, opset = {"exporter": config.onnx_exporter}, config.opset
    if config.onnx_exporter == "dynamo":
        from importlib.util import find_spec

        if find_spec("onnxscript") is None:
            record["exporter_fallback"] = "onnxscript is not installed (pip install 'mbconvert[export]')"
        else:
            try:
                _export_dynamo(wrapper, example, path, config)
            except torch.onnx.errors.OnnxExporterError as e:
                record["exporter_fallback"] = f"the dynamo exporter failed: {str(e).strip().splitlines()[0][:300]}"
        if "exporter_fallback" in record:
            record["exporter"], opset = "torchscript", min(opset, 20)
            path.unlink(missing_ok=True)
    if record["exporter"] == "torchscript":
        _export_torchscript(wrapper, example, path, opset, dynamic_seq)
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    record["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return record


def onnx_session(path: str | Path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, inputs: Inputs, threads: int = 2) -> np.ndarray:
    session = onnx_session(path, threads)
    return np.concatenate([session.run(["logits"], feeds)[0] for feeds in inputs.chunks()])


def save_ort_format(model: Path, out: Path) -> None:
    """`model` as onnxruntime runs it, saved in the ORT format onnxruntime Mobile loads (its offline mode): graph
    optimisations at the 'extended' level, the highest that stays portable across CPUs (the 'all' level adds
    hardware-specific layouts)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.log_severity_level = 3
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def ort_record(onnx_file: Path, inputs: Inputs, onnx_logits_: np.ndarray, config: ExportConfig) -> dict:
    """Save `onnx_file`'s ORT-format twin beside it and check it gives the ONNX file's logits."""
    ort_file = onnx_file.with_suffix(".ort")
    save_ort_format(onnx_file, ort_file)
    return {"file": ort_file.name, "size_mb": size_mb(ort_file), "optimization_level": "extended",
            "vs_onnx": compare(onnx_logits_, onnx_logits(ort_file, inputs, config.threads), config.parity_atol)}


def latency_feeds(batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """A full (unpadded) batch of token ids 1..97 (valid in any vocabulary; ids do not change the cost)."""
    ids = (np.arange(batch * seq_len, dtype=np.int64).reshape(batch, seq_len) % 97) + 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def median_ms(call, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `call()` over `repeats` timed runs after `warmup` untimed ones (every runtime's
    latency in export.json is measured this way)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def onnx_latency(path: str | Path, batch: int, seq_len: int, threads: int = 2, warmup: int = 3,
                 repeats: int = 20) -> float:
    """Median milliseconds of one onnxruntime call on latency_feeds(batch, seq_len). Reusable by benchmarks for
    any of the exported files."""
    session, feeds = onnx_session(path, threads), latency_feeds(batch, seq_len)
    return median_ms(lambda: session.run(["logits"], feeds), repeats, warmup)


def quantize_onnx(fp32: Path, out: Path, inputs: Inputs, static: bool, embedding_bits: int = 8) -> None:
    """INT8 weights (dynamic: activations quantised at run time) or static QDQ calibrated on `inputs`;
    `embedding_bits=4`: the word-embedding lookup made 4-bit first (mbconvert.int4; dynamic only).

    onnxruntime's pre-processing (shape inference + graph optimisation) runs first; its symbolic shape
    inference is skipped because it cannot resolve the dynamic sequence axis through the embeddings' Slices.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, q4 = out.with_name("prepared.onnx"), out.with_name("q4-embeddings.onnx")
    if embedding_bits == 4:
        import onnx

        from .int4 import gather_4bit

        onnx.save(gather_4bit(onnx.load(str(fp32))), str(q4))
        fp32 = q4
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    finally:
        q4.unlink(missing_ok=True)
    try:
        if static:
            quantize_static(str(prepared), str(out), _CalibrationReader(inputs), weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, extra_options=_TYPES)
        else:
            # per-channel scales: one outlier column of a fitted projection no longer sets every column's step
            # (mapped MiniLM MobileBERT on AG News: 80.5% per-tensor vs 85.2% per-channel, FP32 89.8%)
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options=_TYPES)
    finally:
        prepared.unlink(missing_ok=True)


# onnx's shape inference stops at contrib operators (the folded graph's MultiHeadAttention, onnxruntime's fused
# Attention): what it cannot type is float, the only type the graphs mbconvert quantises carry between operators
_TYPES = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over the sample inputs, 8 rows at a time."""

    def __init__(self, inputs: Inputs):
        self._chunks = iter(list(inputs.chunks(8)))

    def get_next(self):
        return next(self._chunks, None)


def latencies(path: Path, seq_len: int, config: ExportConfig) -> dict:
    return {f"batch{b}_ms": onnx_latency(path, b, seq_len, config.threads, repeats=config.latency_repeats)
            for b in config.latency_batch_sizes}


# ---------------------------------------------------------------------------------------------- main

def write_onnx(model: nn.Module, path: Path, inputs: Inputs, config: ExportConfig) -> tuple[dict, nn.Module | None]:
    """model.onnx: a NoNorm MobileBERT's folded graph (mbconvert.folding, written node by node) unless
    `config.onnx_graph` is plain or the model cannot be folded, else the exporter's (export_onnx). Returns
    export.json's record (the graph, the exporter, the opset, and why a MobileBERT was not folded) and the folded
    model (None for the plain graph), which the INT8 file is quantised from."""
    note = None
    if config.onnx_graph == "folded":
        from .folding import folded_or_none, stats, to_onnx

        folded, why = folded_or_none(model)
        if folded is not None:
            import onnx

            onnx.save(to_onnx(folded, config.opset, length=config.seq_len), str(path))
            onnx.checker.check_model(str(path))
            return {"graph": "folded", "exporter": "mbconvert.folding", "opset": config.opset, **stats(model)}, folded
        if type(model).__name__.startswith("MobileBert"):
            note = f"not folded: {why}"
            log.info("export: the plain ONNX graph (%s)", note)
    return {"graph": "plain", **({"graph_note": note} if note else {}), **export_onnx(model, path, inputs, config)}, None


def export_onnx_formats(model, tmp: Path, inputs: Inputs, reference: np.ndarray, config: ExportConfig) -> dict:
    """model.onnx and model.int8.onnx; parity, accuracy, size and latency.

    onnx-int8 implies onnx: the FP32 file is the quantiser's input and the baseline INT8 is judged against.
    """
    out: dict = {}
    fp32 = tmp / "model.onnx"
    exporter, folded = write_onnx(model, fp32, inputs, config)
    stamp_onnx(fp32, model)
    fp32_logits = onnx_logits(fp32, inputs, config.threads)
    out["onnx"] = {"file": fp32.name, "size_mb": size_mb(fp32), **exporter,
                   "dynamic_axes": ["batch"] + ([] if config.seq_len else ["sequence"]),
                   "parity": compare(reference, fp32_logits, config.parity_atol),
                   "accuracy": accuracy(fp32_logits, inputs.labels),
                   "latency": latencies(fp32, inputs.seq_len, config)}
    problems = [f"fell back to the torchscript exporter: {exporter['exporter_fallback']}"] if (
        "exporter_fallback" in exporter) else []
    if not out["onnx"]["parity"]["passed"]:
        problems.append(f"ONNX logits differ from PyTorch by {out['onnx']['parity']['max_abs_diff']:.3g}")
    if config.onnx_ort:
        out["onnx"]["ort"] = ort_record(fp32, inputs, fp32_logits, config)
        if not out["onnx"]["ort"]["vs_onnx"]["passed"]:
            problems.append(f"model.ort differs from model.onnx by {out['onnx']['ort']['vs_onnx']['max_abs_diff']:.3g}")
    if problems:
        out["onnx"]["warning"] = "; ".join(problems)
    if "onnx-int8" in config.formats:
        int8 = tmp / "model.int8.onnx"
        if folded is not None:  # the same folded graph on [batch, length, width]: no reshapes around the attention
            import onnx  # once each MatMul + Add is one quantised op

            from .folding import to_onnx

            source = tmp / "int8-source.onnx"
            onnx.save(to_onnx(folded, config.opset, length=config.seq_len, layout="batch"), str(source))
            try:
                quantize_onnx(source, int8, inputs, config.int8_static, config.embedding_bits)
            finally:
                source.unlink(missing_ok=True)
        else:
            quantize_onnx(fp32, int8, inputs, config.int8_static, config.embedding_bits)
        stamp_onnx(int8, model)
        logits = onnx_logits(int8, inputs, config.threads)
        acc32, acc8 = out["onnx"]["accuracy"], accuracy(logits, inputs.labels)
        vs_fp32 = compare(fp32_logits, logits, config.parity_atol)
        drop = round(100 * (acc32 - acc8 if acc8 is not None else 1.0 - vs_fp32["argmax_agreement"]), 4)  # points
        out["onnx-int8"] = {"file": int8.name, "mode": "static" if config.int8_static else "dynamic",
                            "embedding_bits": config.embedding_bits,
                            "size_mb": size_mb(int8), "size_ratio": round(size_mb(int8) / size_mb(fp32), 3),
                            "vs_fp32": vs_fp32, "accuracy": acc8, "accuracy_fp32": acc32,
                            "accuracy_drop": drop, "accuracy_basis": "labels" if acc8 is not None else "fp32 argmax",
                            "latency": latencies(int8, inputs.seq_len, config)}
        warnings8 = []
        if config.onnx_ort:
            out["onnx-int8"]["ort"] = ort = ort_record(int8, inputs, logits, config)
            if not ort["vs_onnx"]["passed"]:
                warnings8.append(f"model.int8.ort differs from model.int8.onnx by {ort['vs_onnx']['max_abs_diff']:.3g}")
        if drop > config.tolerance:
            basis = out["onnx-int8"]["accuracy_basis"]
            warnings8.append(f"INT8 loses {drop:.2f} points of accuracy vs FP32 ({basis}), "
                             f"more than the tolerance {config.tolerance:g} points")
        if warnings8:
            out["onnx-int8"]["warning"] = "; ".join(warnings8)
    return out


def render_summary(report: dict) -> str:
    """The terminal summary of an export report."""
    lines = [f"exported {report['source']} → {report.get('out_dir', '')}"]
    for fmt, a in report["artifacts"].items():
        parity = a.get("parity") or a.get("vs_fp32") or a.get("vs_onnx")
        text = f"  {a['file']:<18} {a['size_mb']:8.2f} MB"
        if parity:
            text += f"  max|Δ| {parity['max_abs_diff']:.2e}  argmax {parity['argmax_agreement']:.1%}"
        if a.get("latency"):
            text += "  " + "  ".join(f"{k.replace('_ms', '')} {v:.1f} ms" for k, v in a["latency"].items())
        if fmt == "onnx-text":
            text += f"  token ids differ on {a['token_parity']['differing']}/{a['token_parity']['texts']} texts"
        if fmt == "coreml":
            text += f"  {a['precision']}, {a['spec']['mil_ops']} MIL ops"
            text += "" if a["parity"] else ", no prediction here"
        lines.append(text + ("  (see warning)" if a.get("warning") else ""))
    return "\n".join(lines)


def require_formats(formats) -> None:
    """Fail before any work when a requested format's backend is not installed."""
    # import-time noise of working backends: coremltools' "torch untested"; torchao (pulled in by executorch) failing to
    # load CUDA-only kernels on a CPU build, and its enum registrations that torch's pytree calls deprecated
    for name in ("coremltools", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for fmt in formats:
        require(*NEEDS[fmt], extra=EXTRAS[fmt])


def _installed(fmt: str) -> bool:
    try:
        require_formats([fmt])
    except MissingDependencyError:
        return False
    return True


def resolve_formats(config: ExportConfig) -> ExportConfig:
    """`formats=None` (the CLI's default) becomes every format whose backend imports, with one log line naming
    the skipped ones; explicit formats must all be installed (MissingDependencyError naming the extra)."""
    if config.formats is not None:
        require_formats(config.formats)
        return config
    available = tuple(fmt for fmt in FORMATS if _installed(fmt))
    if not available:
        extras = ", ".join(f"'mbconvert[{extra}]'" for extra in dict.fromkeys(EXTRAS.values()))
        raise MissingDependencyError(f"no export backend is installed ({', '.join(BACKENDS)}): pip install {extras}")
    skipped = [fmt for fmt in FORMATS if fmt not in available]
    if skipped:
        by_extra = {extra: [f"{fmt} (needs {' and '.join(NEEDS[fmt])})" for fmt in skipped if EXTRAS[fmt] == extra]
                    for extra in dict.fromkeys(EXTRAS[fmt] for fmt in skipped)}
        log.warning("export: skipped %s", "; ".join(f"{', '.join(fmts)}: pip install 'mbconvert[{extra}]' installs "
                                                     f"{'it' if len(fmts) == 1 else 'them'}"
                                                     for extra, fmts in by_extra.items()))
    return dataclasses.replace(config, formats=available)


def text_format(config: ExportConfig, tokenizer, explicit: bool) -> ExportConfig:
    """onnx-text needs a BERT WordPiece tokenizer: without one it is an error when asked for (`explicit`), else it
    is skipped with a warning."""
    if "onnx-text" not in config.formats:
        return config
    from .text_onnx import unsupported

    reason = unsupported(tokenizer)
    if reason is None:
        return config
    if explicit:
        raise TokenizerError(f"onnx-text: {reason}")
    log.warning("export: skipped onnx-text: %s", reason)
    return dataclasses.replace(config, formats=tuple(f for f in config.formats if f != "onnx-text"))


def id2label(model) -> dict[str, str]:
    """The model's class names by id as JSON keys ("0", "1", ...), for metadata an app reads."""
    names = model.config.id2label or {}
    return {str(i): str(names.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)}


def write_app_config(model, folder: Path) -> None:
    """config.json (with id2label), so the export folder loads like a Hugging Face folder (AutoConfig,
    AutoTokenizer beside it, optimum's ORTModel)."""
    config = copy.deepcopy(model.config)
    config.architectures = config.architectures or [type(model).__name__]
    config.save_pretrained(str(folder))


def stamp_onnx(path: Path, model) -> None:
    """metadata_props an app can read without mbconvert (onnxruntime's get_modelmeta().custom_metadata_map)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"id2label": json.dumps(id2label(model), ensure_ascii=False),
                                        "mbconvert_version": __version__, "inputs": ",".join(INPUT_NAMES)})
    onnx.save(proto, str(path))


def fp16_safe(model, inputs: Inputs, activations: dict, config: ExportConfig) -> tuple[nn.Module, dict]:
    """`--fp16-safe`: when `on`, or `auto` and the FP16 headroom on `inputs` is below the margin, a copy of the
    model rescaled per channel so that its activations fit FP16 with the same function (mbconvert.fp16); else the
    model itself. Returns the model to export and export.json's `fp16_safe` section."""
    room = activations["fp16_headroom"]
    section = {"mode": config.fp16_safe, "margin": config.fp16_margin, "fp16_headroom": room}
    if config.fp16_safe == "off" or (config.fp16_safe == "auto" and (room is None or room >= config.fp16_margin)):
        reason = "--fp16-safe off" if config.fp16_safe == "off" else "the FP16 headroom is at least the margin"
        return model, {**section, "rescaled": False, "reason": reason}
    from .fp16 import make_fp16_safe

    safe = copy.deepcopy(model)
    section.update(make_fp16_safe(safe, inputs.encoded(), config.fp16_margin, activations=activations))
    if section["reason"] and config.fp16_safe == "on":
        section["warning"] = f"--fp16-safe on did nothing: {section['reason']}"
    elif section.get("unbounded"):
        section["warning"] = (f"the FP16 rescale cannot bound {', '.join(section['unbounded'])} within "
                              f"65504 / {config.fp16_margin:g} (export.json: fp16_safe.not_rescalable)")
    return (safe if section["rescaled"] else model), section


def export_model(model, folder: Path, config: ExportConfig | None = None, data: Encoded | None = None,
           source: str = "", data_source: str | None = None, tokenizer=None, texts=None) -> dict:
    """Write every format in `config.formats` (None: every installed one) and config.json into `folder` (an empty
    working folder: the pipeline makes it and moves it into place) and check each against PyTorch on `data`
    (tokenised; synthetic rows without). With `config.fp16_safe` the artifacts come from a copy rescaled to fit FP16
    (`fp16_safe`), still checked against the model as given. onnx-text (the string-in model) needs `tokenizer`, and
    checks its parity on `texts` (the rows of `data` as text). Returns export.json's content."""
    explicit = config is not None and config.formats is not None
    config = text_format(resolve_formats(config or ExportConfig()), tokenizer, explicit)
    model.eval()
    inputs = sample_inputs(model, data, config, data_source)
    reference = torch_logits(model, inputs)
    activations = activation_peaks(model, inputs.encoded())
    model, safe = fp16_safe(model, inputs, activations, config)  # the reference stays the model as given
    report = {"schema_version": SCHEMA_VERSION, "source": source,
              "model": {"type": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                        "num_labels": model.config.num_labels},
              "config": config.to_dict(), "versions": versions(*BACKENDS),
              "inputs": {"source": inputs.source, "rows": len(inputs.input_ids), "seq_len": inputs.seq_len,
                         "labelled": inputs.labels is not None, "pytorch_accuracy": accuracy(reference, inputs.labels)},
              "activations": activations, "fp16_safe": safe, "artifacts": {}}
    if {"onnx", "onnx-int8", "onnx-text"} & set(config.formats):
        report["artifacts"].update(export_onnx_formats(model, folder, inputs, reference, config))
        if config.precision == "mixed":  # model.mixed.onnx from model.onnx (mbconvert.mixed_precision)
            from .mixed_precision import export_onnx_mixed

            report["artifacts"]["onnx-mixed"] = export_onnx_mixed(model, folder, inputs, config)
    if "onnx-text" in config.formats:  # model.text.onnx from model.onnx (mbconvert.text_onnx)
        from .text_onnx import export_text_format  # imports this module: loaded only when needed

        report["artifacts"]["onnx-text"] = export_text_format(model, folder / "model.onnx", folder, tokenizer,
                                                              texts, inputs, config)
    if "coreml" in config.formats:
        from .coreml import export_coreml_format  # imports this module: loaded only when needed

        report["artifacts"]["coreml"] = export_coreml_format(model, folder, inputs, reference, config,
                                                             None if safe["rescaled"] else activations)
    if {"executorch", "executorch-int8", "litert", "litert-int8"} & set(config.formats):
        from .mobile_runtimes import export_mobile_formats  # imports this module: loaded only when needed

        report["artifacts"].update(export_mobile_formats(model, folder, inputs, reference, config))
    write_app_config(model, folder)
    report["warnings"] = [f"{fmt}: {a['warning']}" for fmt, a in {"fp16-safe": safe, **report["artifacts"]}.items()
                          if a.get("warning")]
    for warning in report["warnings"]:
        log.warning("warning: %s", warning)
    return report
