"""4-bit word embeddings for the INT8 ONNX file (`mbconvert export --embedding-bits 4`).

After `--prune-vocab` the word-embedding table is still the largest single weight of a MobileBERT (15,235 × 128
rows on AG News: 1.95 MB of a 5.4 MB INT8 file). Its rows are only looked up, never multiplied, so they take
block-wise 4-bit quantisation well: every block of `block` consecutive values of a row gets its own float scale and
4-bit zero point (asymmetric, round to nearest), the values two to a byte (low nibble first), and the lookup becomes
onnxruntime's `com.microsoft.GatherBlockQuantized`, which gathers the rows and dequantises only them. At block 32 a
128-wide row takes 64 + 16 + 2 = 82 bytes instead of 128 (8-bit) or 512 (FP32).

The rewrite is applied to the FP32 graph before onnxruntime's dynamic quantiser, which leaves the contrib op alone
and quantises everything else to 8 bits as before. `GatherBlockQuantized` runs on onnxruntime's CPU provider (and
WebGPU); a runtime without it must use the 8-bit file.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

BLOCKS = (16, 32, 64, 128)  # GatherBlockQuantized's block sizes: a power of two, at least 16
LEVELS = 15  # 4 bits: 0..15


def quantize_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed values [rows, cols/2] uint8, scales [rows, cols/block] float32, packed zero points
    [rows, ceil(cols/block/2)] uint8) of a [rows, cols] table; cols a multiple of `block`."""
    rows, cols = table.shape
    if block not in BLOCKS or cols % block:
        raise ConfigError(f"4-bit embeddings need a block size in {BLOCKS} dividing the width {cols}, not {block}")
    blocks = table.astype(np.float64).reshape(rows, cols // block, block)
    lo, hi = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # the range holds 0 exactly
    scale = np.where(hi > lo, (hi - lo) / LEVELS, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, LEVELS)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, LEVELS).astype(np.uint8).reshape(rows, cols)
    return _pack(q), scale.astype(np.float32), _pack(zero.astype(np.uint8))


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int) -> np.ndarray:
    """The float32 table `quantize_rows` stands for (what GatherBlockQuantized returns for every row)."""
    rows, n_blocks = scales.shape
    q = _unpack(packed, n_blocks * block).reshape(rows, n_blocks, block).astype(np.float32)
    z = _unpack(zeros, n_blocks).astype(np.float32)
    return ((q - z[..., None]) * scales[..., None]).reshape(rows, n_blocks * block)


def _pack(q: np.ndarray) -> np.ndarray:
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return out[:, :n]


def word_embedding_gather(model, ids: str = "input_ids"):
    """The Gather node that looks `ids` up in a 2-D initializer (the word-embedding table), and that initializer;
    ConfigError when the graph has none."""
    tables = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == ids and node.input[0] in tables:
            if not any(a.name == "axis" and a.i != 0 for a in node.attribute):
                return node, tables[node.input[0]]
    raise ConfigError(f"4-bit embeddings: no Gather reads {ids} from a 2-D weight table in this ONNX graph")


def gather_4bit(model, block: int = 32, ids: str = "input_ids"):
    """`model` (an FP32 onnx.ModelProto, changed in place and returned) with its word-embedding lookup replaced by
    a 4-bit com.microsoft.GatherBlockQuantized of the same table."""
    from onnx import TensorProto, helper, numpy_helper

    node, table = word_embedding_gather(model, ids)
    if table.data_type != TensorProto.FLOAT:
        raise ConfigError("4-bit embeddings quantise an FP32 table; this one is "
                          f"{TensorProto.DataType.Name(table.data_type)}")
    packed, scales, zeros = quantize_rows(numpy_helper.to_array(table), block)
    names = [f"{table.name}_q4", f"{table.name}_q4_scales", f"{table.name}_q4_zero_points"]
    for name, array in zip(names, (packed, scales, zeros)):
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    if not any(table.name in n.input for n in model.graph.node if n is not node):
        model.graph.initializer.remove(table)
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(index, helper.make_node(
        "GatherBlockQuantized", [names[0], ids, names[1], names[2]], list(node.output), name=node.name + "_q4",
        domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=4))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
