"""4-bit word embeddings in the INT8 ONNX file (mbconvert.int4, `mbconvert export --embedding-bits 4`): block-wise
4-bit rows, looked up by onnxruntime's GatherBlockQuantized, the rest of the file 8-bit as before (the export
command's test is in test_export.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mbconvert.errors import ConfigError
from mbconvert.int4 import _pack, dequantize_rows, gather_4bit, quantize_rows
from test_folding import FEEDS, batch, mobilebert


def test_each_block_of_a_row_is_quantised_to_16_levels_within_half_a_step():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(37, 64)).astype(np.float32)
    table[3, :32] = 0.0  # a block of zeros stays zeros
    table[5, 32:] = 2.5  # one value in a block: exact
    packed, scales, zeros = quantize_rows(table, 32)
    assert packed.shape == (37, 32) and scales.shape == (37, 2) and zeros.shape == (37, 1)
    back = dequantize_rows(packed, scales, zeros, 32)
    step = np.repeat(scales, 32, axis=1)
    assert np.all(np.abs(back - table) <= step / 2 + 1e-6)
    assert np.all(back[3, :32] == 0) and np.allclose(back[5, 32:], 2.5)
    q = np.array([[1, 2, 15, 0]], np.uint8)  # two values a byte, the first in the low nibble
    assert _pack(q).tolist() == [[0x21, 0x0F]]
    with pytest.raises(ConfigError, match="block size"):
        quantize_rows(table, 24)


def _session(proto, tmp_path, name):
    import onnx

    from mbconvert.export import onnx_session

    onnx.save(proto, str(tmp_path / name))
    return onnx_session(tmp_path / name)


def test_the_4bit_lookup_returns_exactly_the_dequantised_rows(tmp_path):
    """onnxruntime's GatherBlockQuantized gives the logits of the FP32 graph whose table is the dequantised one."""
    import onnx
    from onnx import numpy_helper

    from mbconvert.folding import FoldedMobileBert, to_onnx
    from mbconvert.int4 import word_embedding_gather

    model = mobilebert()
    proto = to_onnx(FoldedMobileBert(model), layout="batch")
    _, table = word_embedding_gather(proto)
    rows = numpy_helper.to_array(table)
    reference = onnx.ModelProto()
    reference.CopyFrom(proto)
    ref_table = next(t for t in reference.graph.initializer if t.name == table.name)
    ref_table.CopyFrom(numpy_helper.from_array(dequantize_rows(*quantize_rows(rows, 32), 32), table.name))
    q4 = gather_4bit(proto, 32)
    ops = [n.op_type for n in q4.graph.node]
    assert "GatherBlockQuantized" in ops and table.name not in {t.name for t in q4.graph.initializer}
    data = batch()
    feeds = {k: getattr(data, k).numpy() for k in FEEDS}
    got = _session(q4, tmp_path, "q4.onnx").run(["logits"], feeds)[0]
    want = _session(reference, tmp_path, "ref.onnx").run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_graph_without_an_embedding_lookup_is_refused():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1])])
    with pytest.raises(ConfigError, match="no Gather reads input_ids"):
        gather_4bit(helper.make_model(graph))
