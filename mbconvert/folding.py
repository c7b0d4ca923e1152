"""An exactly equivalent, leaner inference graph of a NoNorm MobileBERT, for export (issue 20).

At batch 1 the exported MobileBERT's time is set by the number of operators it dispatches, not by its arithmetic
(benchmarks/NOTES.md, "Where the time goes"): transformers' graph has eight NoNorms per layer (a Mul and an Add
each), MatMul + Add pairs that onnxruntime cannot fuse on 3-D tensors, and separate projections that read the same
input. `FoldedMobileBert` computes the same logits as `MobileBertForSequenceClassification` (what mbconvert writes:
NoNorm, key_query_shared_bottleneck, no bottleneck attention) with fewer operators:

- **NoNorm folded away.** NoNorm(x) = w·x + b is an elementwise affine map, so every stream is carried divided per
  channel by the product D of the NoNorm weights it has passed through (x = D·x̃). A NoNorm after a residual sum,
  w·(dense(z) + r) + b with r = D·r̃, becomes x̃' = dense'(z) + r̃ with D' = w·D, dense' = dense / D and the bias
  b / D' folded into dense'; the readers of a stream take D on their input columns. No NoNorm operator is left:
  the residual adds are plain adds. (The same per-stream algebra as mbconvert.fp16, with D = the NoNorm weights
  instead of powers of two; FP32 logits agree to rounding, see tests/test_folding.py.)
- **One projection per layer input.** The bottleneck input, the queries, the keys and the values all read the layer
  input h: one [H → 4B] MatMul. The shared q/k bottleneck s = NoNorm(W_s h + b_s) is affine in h and read only by
  the query and key projections, so it is folded into them (q = (W_q W_s) h + W_q b_s + b_q; the attention scale
  1/√d in the query rows).
- **Layouts.** model.onnx runs the encoder on [batch·length, width] rows, where onnxruntime fuses MatMul + Add into
  Gemm (and Gemm + ReLU) in FP32; the INT8 file is quantised from the same graph on [batch, length, width]
  (`layout="batch"`), where DynamicQuantizeMatMul takes the bias anyway and the attention needs no reshape. Every
  projection is written as MatMul + Add, which the dynamic quantiser handles (it does not quantise Gemm).
- **The last layer on the first token.** The pooler reads only the first token, and everything after the attention
  (bottleneck input residual, FFNs, output bottleneck) is row-wise: the last layer computes keys and values for
  every token and the rest for the first token alone (a fifth fewer multiply-adds for a 4-layer model at length
  32, the same logits; `to_onnx(first_only=False)` keeps every row).
- **Embeddings.** The embedding NoNorm's shift joins the embedding transformation's bias (kept apart from the
  position table, which the dynamic quantiser stores in 8 bits with one scale: a shift there would cost the
  positions their resolution).

What it refuses (`unsupported`) is exported through the plain wrapper instead. A NoNorm weight that is zero, or
products of weights outside [1e-6, 1e6], would make the rescaled streams ill-conditioned: refused too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.activations import ACT2FN

from .errors import ConfigError
from .onnx_graph import Graph

SCALE_RANGE = (1e-6, 1e6)  # products of NoNorm weights a stream may be carried divided by


def unsupported(model) -> str | None:
    """Why `model` cannot be folded (None: it can)."""
    from .fp16 import unsupported as not_rescalable  # the same streams, so the same layouts

    why = not_rescalable(model, layer_norm="only NoNorm folds into linear layers")
    if why:
        return why
    config = model.config
    if not config.classifier_activation:
        return "classifier_activation=False"
    if config.hidden_act not in ("relu", "gelu"):
        return f"hidden_act {config.hidden_act} (relu and gelu fold)"
    return None


class Affine(nn.Module):
    """x @ weight + bias, exported as MatMul + Add (weight stored [in, out])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().t().contiguous().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float().contiguous().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def _folded_dense(dense: nn.Linear, d_in: torch.Tensor | None, d_sum: torch.Tensor, norm, d_out: torch.Tensor
                  ) -> Affine:
    """The dense of `norm(dense(z) + r)`, z carried divided by d_in (None: not rescaled), r by d_sum, the result
    by d_out = norm.weight·d_sum: rows / d_sum, columns · d_in, bias (b / d_sum + norm.bias / d_out)."""
    w = dense.weight.double()
    if d_in is not None:
        w = w * d_in[None, :]
    return Affine((w / d_sum[:, None]).float(), (dense.bias.double() / d_sum + norm.bias.double() / d_out).float())


def _check_scale(d: torch.Tensor, where: str) -> torch.Tensor:
    lo, hi = SCALE_RANGE
    mag = d.abs()
    if not bool(((mag >= lo) & (mag <= hi)).all()):
        raise ConfigError(f"cannot fold the NoNorms of {where}: a product of NoNorm weights is outside "
                          f"[{lo:g}, {hi:g}] ({mag.min().item():.3g}..{mag.max().item():.3g})")
    return d


class FoldedFeedForward(nn.Module):
    """relu(x W_i + b_i) W_o' + b_o' + x̃: one of the stacked FFNs (or the layer's own intermediate + output)."""

    def __init__(self, intermediate, output, d_in: torch.Tensor, d_out: torch.Tensor, act: str):
        super().__init__()
        w_i = intermediate.dense.weight.double() * d_in[None, :]
        self.intermediate = Affine(w_i.float(), intermediate.dense.bias.detach())
        self.act, self.act_name = ACT2FN[act], act
        self.output = _folded_dense(output.dense, None, d_in, output.LayerNorm, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.intermediate(x))) + x


class FoldedLayer(nn.Module):
    """One MobileBERT layer on [tokens, width] rows; `d_h` is the scale its input stream is carried divided by."""

    def __init__(self, layer, d_h: torch.Tensor, act: str, index: int):
        super().__init__()
        bneck, att = layer.bottleneck, layer.attention
        self.heads, self.head_size = att.self.num_attention_heads, att.self.attention_head_size
        width = self.heads * self.head_size
        d_a = _check_scale(bneck.input.LayerNorm.weight.double(), f"layer {index}'s bottleneck input")
        # everything that reads h, one MatMul: ã (the bottleneck input / d_a), the queries and keys (the shared q/k
        # bottleneck s = NoNorm(W_s h + b_s) is affine in h and read by nothing else: q = W_q s + b_q is folded to
        # (W_q W_s) h + (W_q b_s + b_q), with the attention scale 1/√d in the query rows) and the values
        inp, shared, value = bneck.input, bneck.attention, att.self.value
        w_a = inp.dense.weight.double() * d_h[None, :]
        b_a = inp.dense.bias.double() + inp.LayerNorm.bias.double() / d_a
        w_s = shared.LayerNorm.weight.double()[:, None] * shared.dense.weight.double() * d_h[None, :]
        b_s = shared.LayerNorm.weight.double() * shared.dense.bias.double() + shared.LayerNorm.bias.double()
        scale = self.head_size ** -0.5
        q, k = att.self.query, att.self.key
        w_q, b_q = scale * q.weight.double() @ w_s, scale * (q.weight.double() @ b_s + q.bias.double())
        w_k, b_k = k.weight.double() @ w_s, k.weight.double() @ b_s + k.bias.double()
        w_v = value.weight.double() * d_h[None, :]
        self.readers = Affine(torch.cat([w_a, w_q, w_k, w_v]).float(),
                              torch.cat([b_a, b_q, b_k, value.bias.double()]).float())
        self.split = (w_a.shape[0], width, width, width)
        d = _check_scale(att.output.LayerNorm.weight.double() * d_a, f"layer {index}'s attention output")
        self.attention_output = _folded_dense(att.output.dense, None, d_a, att.output.LayerNorm, d)
        ffns = []
        for j, ffn in enumerate(getattr(layer, "ffn", None) or []):
            d_next = _check_scale(ffn.output.LayerNorm.weight.double() * d, f"layer {index}'s FFN {j}")
            ffns.append(FoldedFeedForward(ffn.intermediate, ffn.output, d, d_next, act))
            d = d_next
        d_u = _check_scale(layer.output.LayerNorm.weight.double() * d, f"layer {index}'s output")
        ffns.append(FoldedFeedForward(layer.intermediate, layer.output, d, d_u, act))
        self.ffns = nn.ModuleList(ffns)
        up = layer.output.bottleneck
        self.d_out = _check_scale(up.LayerNorm.weight.double() * d_h, f"layer {index}'s output bottleneck")
        self.output_bottleneck = _folded_dense(up.dense, d_u, d_h, up.LayerNorm, self.d_out)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, batch: int, length: int, first_only: bool = False
                ) -> torch.Tensor:
        """[batch·length, H] rows in; with `first_only`, the [batch, H] rows of each text's first token (the keys
        and values still read every token)."""
        a, q, k, v = torch.split(self.readers(h), self.split, dim=-1)
        queries = length
        if first_only:
            a, q, h = (t.reshape(batch, length, -1)[:, 0] for t in (a, q, h))
            queries = 1
        q = q.reshape(batch, queries, self.heads, self.head_size).transpose(1, 2)
        k, v = (t.reshape(batch, length, self.heads, self.head_size).transpose(1, 2) for t in (k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(batch * queries, -1)
        x = self.attention_output(context) + a
        for ffn in self.ffns:
            x = ffn(x)
        return self.output_bottleneck(x) + h

    def columns(self, start: int, stop: int) -> Affine:
        """The readers' output columns start:stop (a, q, k, v in that order) as an Affine of their own."""
        return Affine(self.readers.weight[:, start:stop].t(), self.readers.bias[start:stop])


class FoldedMobileBert(nn.Module):
    """MobileBertForSequenceClassification's logits as a function of (input_ids, attention_mask, token_type_ids),
    with its NoNorms folded away (module docstring). Built from a trained model; inference only."""

    def __init__(self, model, mask_value: float = torch.finfo(torch.float32).min):
        super().__init__()
        why = unsupported(model)
        if why:
            raise ConfigError(f"cannot fold this model: {why}")
        config, base = model.config, model.base_model
        emb = base.embeddings
        with torch.no_grad():
            self.trigram = bool(emb.trigram_input)
            self.word_embeddings = nn.Parameter(emb.word_embeddings.weight.detach().float().clone(),
                                                requires_grad=False)
            norm = emb.LayerNorm
            d_h = _check_scale(norm.weight.double(), "the embeddings")
            transformed = emb.trigram_input or config.embedding_size != config.hidden_size
            self.transform = (nn.Parameter(emb.embedding_transformation.weight.detach().float().t().contiguous(),
                                           requires_grad=False) if transformed else None)
            shift = norm.bias.double() / d_h + (emb.embedding_transformation.bias.double() if transformed else 0)
            self.shift = nn.Parameter(shift.float(), requires_grad=False)
            self.positions = nn.Parameter(emb.position_embeddings.weight.detach().float().clone(), requires_grad=False)
            self.token_types = nn.Parameter(emb.token_type_embeddings.weight.detach().float().clone(),
                                            requires_grad=False)
            layers = []
            for i, layer in enumerate(base.encoder.layer):
                layers.append(FoldedLayer(layer, d_h, config.hidden_act, i))
                d_h = layers[-1].d_out
            self.layers = nn.ModuleList(layers)
            pooler = base.pooler.dense
            self.pooler = Affine((pooler.weight.double() * d_h[None, :]).float(), pooler.bias.detach())
            self.classifier = Affine(model.classifier.weight.detach(), model.classifier.bias.detach())
            self.num_labels = model.classifier.out_features
        self.mask_value = mask_value

    def forward(self, input_ids, attention_mask, token_type_ids):
        batch, length = input_ids.shape
        x = self.word_embeddings[input_ids]
        if self.trigram:
            x = torch.cat([nn.functional.pad(x[:, 1:], [0, 0, 0, 1, 0, 0]), x,
                           nn.functional.pad(x[:, :-1], [0, 0, 1, 0, 0, 0])], dim=2)
        if self.transform is not None:
            x = torch.matmul(x, self.transform)
        h = (x + self.shift + self.positions[:length] + self.token_types[token_type_ids]).reshape(batch * length, -1)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * self.mask_value
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, batch, length, first_only=i == len(self.layers) - 1)
        return self.classifier(torch.tanh(self.pooler(h)))  # h: the first token's rows


# ---------------------------------------------------------------------------------------------- ONNX

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def _affine(g: Graph, x: str, affine: Affine, hint: str) -> str:
    y = g.op("MatMul", [x, g.const(_np(affine.weight), f"{hint}.weight")], hint)
    return g.op("Add", [y, g.const(_np(affine.bias), f"{hint}.bias")], hint)


LAYOUTS = ("rows", "batch")


def to_onnx(folded: FoldedMobileBert, opset: int = 18, length: int | None = None, layout: str = "rows",
            first_only: bool = True):
    """The folded model as an ONNX graph written node by node (no tracing, no exporter): dynamic batch and
    sequence axes (a fixed `length` when given: onnxruntime then folds the position lookup into a constant), the
    inputs and output of the plain export, and one com.microsoft MultiHeadAttention per layer (onnxruntime's fused
    attention kernel, the key padding mask inside it) instead of the dozen reshapes, transposes, MatMuls and the
    softmax of the traced attention.

    `layout`: "rows" runs the encoder on [batch·length, width] rows, where onnxruntime fuses each MatMul + Add into
    a Gemm (FP32: model.onnx); "batch" keeps [batch, length, width], where the dynamic quantiser's
    DynamicQuantizeMatMul takes the bias anyway and the attention needs no reshapes (the INT8 file's source).

    `first_only` (default): the last layer runs on each text's first token alone after its keys and values, the
    only row the pooler reads (every op after the attention is row-wise, so the logits are the same);
    False keeps every row to the end (benchmarks/latency.py measures both)."""
    from onnx import TensorProto, helper

    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    rows = layout == "rows"
    g = Graph("")
    ids, mask, types = INPUTS
    shape = g.op("Shape", [ids], "shape")  # [batch, length]
    rows3 = g.op("Concat", [shape, g.const(np.array([-1]))], "rows3", axis=0) if rows else None  # [batch, length, -1]
    x = g.op("Gather", [g.const(_np(folded.word_embeddings), "word_embeddings"), ids], "words")
    if folded.trigram:
        one, zero, big = g.const(np.array([1])), g.const(np.array([0])), g.const(np.array([2**62]))
        minus = g.const(np.array([-1]))
        after = g.op("Slice", [x, one, big, one], "after")
        before = g.op("Slice", [x, zero, minus, one], "before")
        after = g.op("Pad", [after, g.const(np.array([0, 0, 0, 0, 1, 0]))], "after")
        before = g.op("Pad", [before, g.const(np.array([0, 1, 0, 0, 0, 0]))], "before")
        x = g.op("Concat", [after, x, before], "trigram", axis=2)
    if folded.transform is not None:
        x = g.op("MatMul", [x, g.const(_np(folded.transform), "embedding_transformation")], "transformed")
    # a Gather of 0..L-1, not a Slice: the dynamic quantiser stores a gathered table in 8 bits
    span = g.op("Range", [g.const(np.array(0)), g.op("Gather", [shape, g.const(np.array(1))], "length"),
                          g.const(np.array(1))], "span")
    positions = g.op("Gather", [g.const(_np(folded.positions), "positions"), span], "positions")
    x = g.op("Add", [x, g.const(_np(folded.shift), "embedding_shift")], "shifted")  # the transformation's bias
    x = g.op("Add", [x, positions], "embedded")
    h = g.op("Add", [x, g.op("Gather", [g.const(_np(folded.token_types), "token_types"), types], "types")])
    if rows:
        h = g.op("Reshape", [h, g.const(np.array([-1, folded.positions.shape[1]]), "rows")], "hidden")  # [b·l, H]
    key_mask = g.op("Cast", [mask], "key_mask", to=TensorProto.INT32)
    width = folded.layers[0].split[-1]
    last = len(folded.layers) - 1 if first_only else None
    for i, layer in enumerate(folded.layers):
        p = f"layer.{i}."
        if i == last:
            h, context, a = _first_token_attention(g, h, layer, key_mask, rows3, p)
        else:
            split = g.const(np.array(layer.split), p + "split")
            a, q, k, v = g.op("Split", [_affine(g, h, layer.readers, p + "readers"), split], p + "split",
                              outputs=4, axis=-1)
            if rows:
                q, k, v = (g.op("Reshape", [t, rows3], p + n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
            context = g.op("MultiHeadAttention", [q, k, v, "", key_mask], p + "attention", domain="com.microsoft",
                           num_heads=layer.heads, scale=1.0)  # the biases are the readers', the scale is in q
            if rows:
                context = g.op("Reshape", [context, g.const(np.array([-1, width]), p + "rows")], p + "context")
        x = g.op("Add", [_affine(g, context, layer.attention_output, p + "attention.output"), a], p + "residual")
        for j, ffn in enumerate(layer.ffns):
            f = f"{p}ffn.{j}."
            inner = g.op("Relu" if ffn.act_name == "relu" else "Gelu", [_affine(g, x, ffn.intermediate, f + "in")],
                         f + "act", **({} if ffn.act_name == "relu" else {"domain": "com.microsoft"}))
            x = g.op("Add", [_affine(g, inner, ffn.output, f + "out"), x], f + "residual")
        h = g.op("Add", [_affine(g, x, layer.output_bottleneck, p + "output_bottleneck"), h], p + "output")
    if last is not None:
        first = h  # [batch, H]: the first token's rows
    else:
        if rows:
            h = g.op("Reshape", [h, rows3], "hidden3")
        first = g.op("Gather", [h, g.const(np.array(0))], "first", axis=1)
    pooled = g.op("Tanh", [_affine(g, first, folded.pooler, "pooler")], "pooled")
    g.nodes.append(helper.make_node("Add", [g.op("MatMul", [pooled, g.const(_np(folded.classifier.weight),
                                                                             "classifier.weight")]),
                                            g.const(_np(folded.classifier.bias), "classifier.bias")],
                                    ["logits"], name="classifier"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", length or "sequence"]) for n in INPUTS]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", folded.num_labels])
    # onnx's shape inference does not know contrib ops: typing their outputs lets it (and the quantiser) go on
    def queries(name):  # the last layer's attention has one query a text when first_only
        return 1 if name.startswith(f"layer.{last}.") else length or "sequence"

    typed = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, ["batch", queries(n.output[0]), width])
             for n in g.nodes if n.op_type == "MultiHeadAttention"]
    graph = helper.make_graph(g.nodes, "mobilebert_folded", inputs, [output], g.consts, value_info=typed)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             producer_name="mbconvert.folding")


def _first_token_attention(g: Graph, h: str, layer: FoldedLayer, key_mask: str, rows3: str | None, p: str):
    """The last layer's attention for the first token's query only: its keys and values from every row of `h`
    ([batch·length, H] rows when `rows3`, else [batch, length, H]), its bottleneck input and query from the first
    row. Returns ([batch, H] first rows of h, [batch, W] context, [batch, B] bottleneck input)."""
    width, hidden = layer.split[-1], layer.readers.weight.shape[0]
    aq = layer.split[0] + width
    h3 = g.op("Reshape", [h, rows3], p + "hidden3") if rows3 is not None else h
    first = g.op("Slice", [h3, g.const(np.array([0])), g.const(np.array([1])), g.const(np.array([1]))], p + "first")
    first = g.op("Reshape", [first, g.const(np.array([-1, hidden]), p + "first_rows")], p + "first")
    a, q = g.op("Split", [_affine(g, first, layer.columns(0, aq), p + "readers.first"),
                          g.const(np.array(layer.split[:2]), p + "split.first")], p + "split.first", outputs=2, axis=-1)
    k, v = g.op("Split", [_affine(g, h, layer.columns(aq, aq + 2 * width), p + "readers.keys"),
                          g.const(np.array(layer.split[2:]), p + "split.keys")], p + "split.keys", outputs=2, axis=-1)
    if rows3 is not None:
        k, v = (g.op("Reshape", [t, rows3], p + n) for t, n in ((k, "k"), (v, "v")))
    q = g.op("Reshape", [q, g.const(np.array([-1, 1, width]), p + "one_query")], p + "q")
    context = g.op("MultiHeadAttention", [q, k, v, "", key_mask], p + "attention", domain="com.microsoft",
                   num_heads=layer.heads, scale=1.0)
    context = g.op("Reshape", [context, g.const(np.array([-1, width]), p + "rows")], p + "context")
    return first, context, a


def folded_or_none(model) -> tuple[nn.Module | None, str | None]:
    """(FoldedMobileBert, None), or (None, why not) for a model this module cannot fold."""
    why = unsupported(model)
    if why:
        return None, why
    try:
        return FoldedMobileBert(model).eval(), None
    except ConfigError as e:
        return None, str(e)


def stats(model) -> dict:
    """What folding removed, per the model's config (for export.json)."""
    config = model.config
    ffn = max(config.num_feedforward_networks, 1)
    return {"nonorms_folded": 1 + config.num_hidden_layers * (ffn + 4),  # embeddings; per layer: bottleneck
            # input and shared, attention output, FFN outputs, output, output bottleneck
            "projections_per_layer": {"before": 6 + 2 * ffn + 1, "after": 2 + 2 * ffn + 1},
            "last_layer": "first token only after its keys and values"}
