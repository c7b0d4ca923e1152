"""The folded inference graph (mbconvert.folding): the same logits as transformers' MobileBERT with the NoNorms
folded into the linear layers, one projection per input and fused attention, in PyTorch and in onnxruntime; fewer
operators; refusals named.

Every rewrite is checked against transformers' own MobileBertForSequenceClassification on rows with padding, token
types and several lengths. NoNorm weights and biases are drawn far from the identity (×0.3..3, signs mixed) so a
missing scale or bias shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers
from mbconvert.data import Encoded
from mbconvert.errors import ConfigError
from mbconvert.folding import LAYOUTS, FoldedMobileBert, folded_or_none, stats, to_onnx, unsupported

FEEDS = ("input_ids", "attention_mask", "token_type_ids")
FP32_ATOL = 1e-4  # the export's parity tolerance (ExportConfig.parity_atol)


def mobilebert(seed: int = 0, **overrides):
    """A small NoNorm MobileBERT whose NoNorms are far from the identity and whose logits vary by text."""
    from transformers import MobileBertForSequenceClassification

    torch.manual_seed(seed)
    model = MobileBertForSequenceClassification(helpers.mobilebert_config(type_vocab_size=2, **overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0)
                p.copy_(sign * torch.empty(p.shape).uniform_(0.3, 3.0, generator=g))
            elif name.endswith("LayerNorm.bias"):
                p.copy_(torch.empty(p.shape).uniform_(-0.5, 0.5, generator=g))
        model.classifier.weight.mul_(30)
    return model


def batch(n: int = 6, length: int = 17, seed: int = 1) -> Encoded:
    """Rows of 3..length real tokens (the rest padding, which the fused attention's key padding mask must hide as
    transformers' additive mask does), the second half with token type 1 after position 2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n, 1), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths).long()
    types = torch.zeros_like(mask)
    types[n // 2:, 2:] = 1
    return Encoded(torch.randint(104, 504, mask.shape, generator=g) * mask, mask, types * mask, None)


def reference(model, data: Encoded) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: getattr(data, k) for k in FEEDS}).logits


def folded(model, data: Encoded) -> torch.Tensor:
    with torch.no_grad():
        return FoldedMobileBert(model)(*(getattr(data, k) for k in FEEDS))


def onnx_logits(model, data: Encoded, tmp_path, layout: str = "rows") -> np.ndarray:
    import onnx

    from mbconvert.export import onnx_session

    path = tmp_path / "folded.onnx"
    proto = to_onnx(FoldedMobileBert(model), layout=layout)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return onnx_session(path).run(["logits"], {k: getattr(data, k).numpy() for k in FEEDS})[0]


@pytest.mark.parametrize("overrides", [{}, {"num_feedforward_networks": 1}, {"num_feedforward_networks": 4},
                                       {"hidden_act": "gelu"}, {"trigram_input": False, "embedding_size": 256}],
                         ids=["2ffn", "1ffn", "4ffn", "gelu", "no-trigram"])
def test_folded_pytorch_model_gives_transformers_logits(overrides):
    model = mobilebert(**overrides)
    data = batch()
    want, got = reference(model, data), folded(model, data)
    assert want.std() > 0.5  # logits that differ by text: a wrong fold would show
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("layout", ["rows", "batch"])
@pytest.mark.parametrize("shape", [(1, 5), (6, 17), (3, 40)], ids=["batch1", "batch6", "len40"])
def test_folded_onnx_graph_gives_transformers_logits_at_any_batch_and_length(shape, layout, tmp_path):
    model = mobilebert()
    data = batch(*shape)
    want = reference(model, data).numpy()
    got = onnx_logits(model, data, tmp_path, layout)
    assert np.abs(got - want).max() <= FP32_ATOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("length", [1, 2])
def test_the_shortest_texts_give_transformers_logits(length, tmp_path):
    """One or two tokens: the trigram's shifted copies are empty or one token wide."""
    model = mobilebert()
    ids = torch.tensor([[101, 300], [101, 250]])[:, :length]
    data = Encoded(ids, torch.ones_like(ids), torch.zeros_like(ids), None)
    assert np.abs(onnx_logits(model, data, tmp_path) - reference(model, data).numpy()).max() <= FP32_ATOL


@pytest.mark.parametrize("opset, length", [(17, None), (18, 17), (21, None)], ids=["opset17", "fixed", "opset21"])
def test_opsets_and_a_fixed_length(opset, length, tmp_path):
    """Split's two spellings (sizes as an input before opset 18, num_outputs from 18) and a fixed sequence axis."""
    import onnx

    from mbconvert.export import onnx_session

    model, data = mobilebert(), batch(4, 17)
    proto = to_onnx(FoldedMobileBert(model), opset, length=length)
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == (length or 0)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    got = onnx_session(tmp_path / "m.onnx").run(["logits"], {k: getattr(data, k).numpy() for k in FEEDS})[0]
    assert np.abs(got - reference(model, data).numpy()).max() <= FP32_ATOL


def test_the_folded_graph_has_no_nonorm_and_one_fused_attention_per_layer():
    model = mobilebert()
    proto = to_onnx(FoldedMobileBert(model))
    ops = [n.op_type for n in proto.graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("MultiHeadAttention") == layers
    assert "Mul" not in ops and "Softmax" not in ops and "Transpose" not in ops
    # per layer: readers (a, q, k, v), attention output, 2 per FFN, output bottleneck; plus the embedding
    # transformation, pooler and classifier; the last layer reads (a, q) of the first row apart from (k, v)
    assert ops.count("MatMul") == layers * (3 + 2 * model.config.num_feedforward_networks) + 3 + 1
    assert stats(model)["nonorms_folded"] == 1 + layers * (model.config.num_feedforward_networks + 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_after_its_attention_the_last_layer_runs_on_the_first_token_alone(layout, tmp_path):
    """The pooler reads only the first token and everything after the attention is row-wise: the last layer's
    FFNs see [batch, width] (one row a text), and the logits equal those of the graph that keeps every row."""
    import onnx

    from mbconvert.export import onnx_session

    model = mobilebert()
    data = batch(n=5, length=9)
    feeds = {k: getattr(data, k).numpy() for k in FEEDS}
    proto = to_onnx(FoldedMobileBert(model), layout=layout)
    last = model.config.num_hidden_layers - 1
    ffn_inputs = [n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and n.output[0].startswith(
        f"layer.{last}.ffn.")]
    proto.graph.output.extend(onnx.ValueInfoProto(name=x) for x in ffn_inputs)  # read them back
    onnx.save(proto, str(tmp_path / "m.onnx"))
    seen = onnx_session(tmp_path / "m.onnx").run(ffn_inputs, feeds)
    assert len(seen) == 2 * model.config.num_feedforward_networks and all(a.shape[:-1] == (5,) for a in seen)
    logits = {}
    for first_only in (True, False):
        onnx.save(to_onnx(FoldedMobileBert(model), layout=layout, first_only=first_only), str(tmp_path / "m.onnx"))
        logits[first_only] = onnx_session(tmp_path / "m.onnx").run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[True], reference(model, data).numpy(), rtol=1e-4, atol=1e-5)


def test_folded_graph_runs_fewer_operators_than_the_traced_one(tmp_path):
    """What onnxruntime executes after its own graph optimisations, FP32 and dynamic INT8."""
    import onnx

    from mbconvert.config import ExportConfig
    from mbconvert.export import export_onnx, onnx_session, quantize_onnx, sample_inputs

    model = mobilebert()
    config = ExportConfig(formats=("onnx",))  # the dynamo exporter's plain graph
    inputs = sample_inputs(model, batch(), config)
    plain, lean = tmp_path / "plain.onnx", tmp_path / "lean.onnx"
    export_onnx(model, plain, inputs, config)
    onnx.save(to_onnx(FoldedMobileBert(model)), str(lean))

    def executed(path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return len(onnx.load(opts.optimized_model_filepath).graph.node)

    quantize_onnx(plain, plain.with_suffix(".int8.onnx"), inputs, static=False)
    onnx.save(to_onnx(FoldedMobileBert(model), layout="batch"), str(tmp_path / "batch.onnx"))  # what export quantises
    quantize_onnx(tmp_path / "batch.onnx", lean.with_suffix(".int8.onnx"), inputs, static=False)
    assert executed(lean) < 0.6 * executed(plain)
    assert executed(lean.with_suffix(".int8.onnx")) < 0.6 * executed(plain.with_suffix(".int8.onnx"))
    int8 = onnx_session(lean.with_suffix(".int8.onnx")).run(["logits"], inputs.feeds())[0]
    assert np.isfinite(int8).all()


def test_layer_norm_and_foreign_models_are_not_folded():
    assert "normalization_type layer_norm" in unsupported(mobilebert(normalization_type="layer_norm"))
    assert "is not a MobileBertForSequenceClassification" in unsupported(helpers.random_student(hidden=64, layers=1,
                                                                                               heads=2))
    model, why = folded_or_none(mobilebert(normalization_type="layer_norm"))
    assert model is None and "layer_norm" in why


def test_a_zero_nonorm_weight_is_refused_with_the_place_named():
    model = mobilebert()
    with torch.no_grad():
        model.mobilebert.encoder.layer[1].attention.output.LayerNorm.weight[3] = 0.0
    with pytest.raises(ConfigError, match="layer 1's attention output"):
        FoldedMobileBert(model)
    assert folded_or_none(model)[0] is None


def test_export_writes_the_folded_graph_by_default_and_the_plain_one_on_request(tokenizer, tmp_path):
    """`mbconvert export` of a NoNorm MobileBERT: model.onnx is the folded graph (export.json says so and what was
    folded), with PyTorch's logits and a working INT8 file; `--onnx-graph plain` gives the exporter's graph."""
    import onnx

    from mbconvert.config import ExportConfig
    from mbconvert.pipeline import export_checkpoint

    model = mobilebert(vocab_size=len(tokenizer))
    for graph in ("folded", "plain"):
        cfg = ExportConfig(formats=("onnx", "onnx-int8"), latency_repeats=1, latency_batch_sizes=(1,),
                           onnx_graph=graph)
        report = export_checkpoint(model, cfg, out=tmp_path / graph, tokenizer=tokenizer)
        onnx_report, int8 = report["artifacts"]["onnx"], report["artifacts"]["onnx-int8"]
        assert onnx_report["graph"] == graph and onnx_report["parity"]["passed"]
        assert int8["vs_fp32"]["argmax_agreement"] >= 0.9
        ops = [n.op_type for n in onnx.load(str(tmp_path / graph / "model.onnx")).graph.node]
        assert ("MultiHeadAttention" in ops) == (graph == "folded")
    assert report["artifacts"]["onnx"]["exporter"] != "mbconvert.folding"


def test_a_model_that_cannot_be_folded_is_exported_plain_with_the_reason(tokenizer, tmp_path):
    from mbconvert.config import ExportConfig
    from mbconvert.pipeline import export_checkpoint

    model = mobilebert(vocab_size=len(tokenizer), normalization_type="layer_norm")
    report = export_checkpoint(model, ExportConfig(formats=("onnx",), latency_batch_sizes=()), out=tmp_path / "o",
                               tokenizer=tokenizer)
    assert report["artifacts"]["onnx"]["graph"] == "plain" and report["artifacts"]["onnx"]["parity"]["passed"]
    assert "layer_norm" in report["artifacts"]["onnx"]["graph_note"]


def test_the_string_in_model_runs_on_the_folded_graph(tokenizer, tmp_path):
    """onnx-text joins the tokenizer graph to model.onnx, here the folded graph with its contrib attention."""
    from mbconvert.config import ExportConfig
    from mbconvert.pipeline import export_checkpoint
    from mbconvert.text_onnx import TEXT_FILE, session

    model = mobilebert()
    texts = [r["text"] for r in helpers.synthetic_rows(6, seed=3)]
    report = export_checkpoint(model, ExportConfig(formats=("onnx", "onnx-text"), latency_batch_sizes=()),
                               out=tmp_path / "o", tokenizer=tokenizer)
    assert report["artifacts"]["onnx"]["graph"] == "folded"
    logits = session(tmp_path / "o" / TEXT_FILE, threads=1).run(["logits"], {"texts": np.array(texts, dtype=object)})[0]
    enc = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt",
                    return_token_type_ids=True)
    want = reference(model, Encoded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], None)).numpy()
    assert np.abs(logits - want).max() <= FP32_ATOL
