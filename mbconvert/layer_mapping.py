"""Stage 2, one layer: `LayerMapper` maps one BERT layer onto one MobileBERT layer.

The block diagram of mbconvert.mapping, one layer, labelled with the names the code uses:

  BERT (t)        x ─ attention(A heads of d) ─(+x)─ LN1(g1, be1) ─ s ─ FFN(w1,b1 → w2,b2) ─(+s)─ LN2(g2, be2) ─ out

  MobileBERT (m)  xm ─ bottleneck.attention (reduce) ─ u ─ query, key ─┐
                  xm ───────────────────────────────────── value ──────┴─ attention(heads of dd) ─ context ─┐
                                                                             attention.output.dense ────────(+)─ NoNorm ─ z
                  xm ─ bottleneck.input (into_stream) ──────────────────────────── layer_input ─────────────┘
                  z ─ N × [up ─ act ─ down ─(+z)─ NoNorm] ─ z_ffn ─ output.bottleneck.dense ─(+xm)─ NoNorm ─ out

Symbols:
  H, b            inter-block width (the source's hidden size) and intra-block width (the bottleneck)
  A, d            the source's heads and head size (d = H/A); heads, dd (d_out): MobileBERT's (dd = b/heads)
  x, x_seq        the source's layer input: flat (real tokens × H) / padded (batch × seq × H)
  xm, x_mobile    the MobileBERT's own layer input, flat / padded: fits use it, so earlier layers' errors are
                  corrected rather than compounded
  s, out          the source's post-attention state (LN1 output, the FFN input) and layer output (LN2 output)
  Q, mu           s's b principal directions (b × H rows) and mean μ: the stream carries z = Q·(s − μ)
  z               the intra-block stream (b): after the attention-output norm ≈ Q·(s − μ); after FFN group k
                  ≈ Q·(partial − μ)
  sigma1, sigma2  σ̄: the mean per-token std of LN1's / LN2's input; centre = I − 1/H removes the token mean
  into_stream     Q·diag(g1/σ̄₁)·centre: LN1 linearised, ∂z/∂(LN1 input)
  kept, slot      the kept student heads (most important first, then sorted) and a kept head's MobileBERT slot
  g               the kept heads' query and key rows stacked ([W_q,j; W_k,j] per kept head j): they define scores
  m2, root, inv_root   E[xm·xmᵀ] and its square root and inverse square root (whitening: the q/k bottleneck keeps
                  the scores under the input's own distribution)
  basis, sv       the b whitened-input directions (H × b) that best keep g (top right singular vectors of g·root),
                  and g·root's singular values
  reduce, expand  basisᵀ·inv_root (x → u) and root·basis (u → x)
  u               bottleneck.attention's output: the shared query/key input (b)
  scale           √dd/√d: the source's scores divide by √d, MobileBERT's by √dd
  ov              into_stream·W_o,j·W_v,j: kept head j's value → stream product (b × H)
  context         MobileBERT's multi-head attention output, before attention.output.dense
  layer_input     bottleneck.input(xm): the residual path of x into the stream
  w1, b1, w2, b2  the source's FFN input and output projections
  pre_all, p      the source's FFN pre-activations on s (tokens × neurons); p: one neuron's
  a, c            per-neuron GELU → ReLU calibration: relu(a·p + c) ≈ gelu(p)
  partial         s plus the FFN groups mapped so far (+ b2 after the last): each FFN block's target
  up, down, norm  one MobileBERT FFN block: intermediate.dense, output.dense, output.LayerNorm
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import MobileBertConfig

from . import linalg
from .config import ConvertConfig
from .linalg import F64


@dataclass(frozen=True)
class LayerActivations:
    """The student's activations around one layer on calibration text. Flat fields hold real tokens only
    (padding dropped by `mask`); `x_seq` is the padded input that attention needs."""

    x: torch.Tensor  # layer input, flat (tokens × H)
    s: torch.Tensor  # post-attention state (LN1 output), flat
    out: torch.Tensor  # layer output (LN2 output), flat
    x_seq: torch.Tensor  # layer input, padded (batch × seq × H)
    mask: torch.Tensor  # (batch × seq) bool: real tokens
    mask4d: torch.Tensor  # additive attention mask (batch × 1 × 1 × seq)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, …) → (real tokens, …)."""
        return x[self.mask]


def set_linear(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy in float32; `+ 0.0` turns −0.0 into +0.0 (LAPACK's sign of an exact zero is not stable, and
    the output bytes must be)."""
    assert layer.weight.shape == weight.shape, (layer.weight.shape, weight.shape)
    layer.weight.copy_(weight.float() + 0.0)
    layer.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias.float() + 0.0)


def set_identity_norm(norm: nn.Module) -> None:
    norm.weight.fill_(1.0)
    norm.bias.zero_()


class LayerMapper:
    """Maps one BERT layer (t) onto one MobileBERT layer (m); `run` fits it on calibration activations.

    `run` sets the stream (Q, mu, into_stream), then maps attention, the FFNs and the output bottleneck in
    turn, each refitted on the MobileBERT's own input when there is data."""

    def __init__(self, cfg: ConvertConfig, t_layer, m_layer, mc: MobileBertConfig, head_importance, neuron_importance):
        self.cfg, self.t, self.m, self.mc = cfg, t_layer, m_layer, mc
        self.head_importance, self.neuron_importance = head_importance, neuron_importance
        self.H, self.b = mc.hidden_size, mc.intra_bottleneck_size
        self.A = t_layer.attention.self.num_attention_heads
        self.d = self.H // self.A
        self.heads = mc.num_attention_heads
        self.d_out = self.b // self.heads
        self.act = {"relu": torch.relu, "gelu": nn.functional.gelu}[mc.hidden_act]
        self.report: dict = {}

    def w(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return linear.weight.to(F64), linear.bias.to(F64)

    def rows(self, j: int) -> slice:
        """Student head j's rows of W_q, W_k, W_v (its columns of W_o)."""
        return slice(j * self.d, (j + 1) * self.d)

    def run(self, acts: LayerActivations | None, x_mobile: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
        """Map the layer; with data, return the MobileBERT layer's output (batch, seq, H) for the next one."""
        t = self.t
        data = acts is not None
        s = acts.s if data else None
        w1, b1 = self.w(t.intermediate.dense)
        g1, be1 = t.attention.output.LayerNorm.weight.to(F64), t.attention.output.LayerNorm.bias.to(F64)
        g2, be2 = t.output.LayerNorm.weight.to(F64), t.output.LayerNorm.bias.to(F64)
        # the b-dim stream: coordinates of the post-attention state in its principal directions
        self.Q, energy = linalg.top_subspace(s, self.b, fallback=w1 * g1)
        self.mu = s.to(F64).mean(0) if data else be1
        sigma1 = self._ln_input_std(acts, "attention") if data else 1.0
        sigma2 = self._ln_input_std(acts, "output") if data else 1.0
        centre = torch.eye(self.H, dtype=F64) - 1.0 / self.H
        self.into_stream = self.Q @ torch.diag(g1 / sigma1) @ centre  # d(stream)/d(LN1 input), linearised
        self.report["stream_energy"] = energy
        xm = acts.flat(x_mobile) if data else None
        z = self._attention(acts, x_mobile, xm, be1)
        z_ffn = self._ffns(z, s, w1, b1)
        out = self._output(acts, z_ffn, xm, g2 / sigma2, be2, centre)
        if not data:
            return self.report, None
        full = torch.zeros_like(x_mobile)  # back to (batch, tokens, H) for the next layer's attention
        full[acts.mask] = out.float()
        return self.report, full

    def _ln_input_std(self, acts: LayerActivations, which: str) -> float:
        """Mean per-token std of the LayerNorm's input (to linearise LN as γ/σ̄·centre + β)."""
        x, s = acts.x.to(F64), acts.s.to(F64)
        if which == "attention":
            context = acts.flat(self.t.attention.self(acts.x_seq, attention_mask=acts.mask4d)[0])
            pre = x + self.t.attention.output.dense(context).to(F64)
        else:
            h = self.t.intermediate(s.float())
            pre = s + self.t.output.dense(h).to(F64)
        return float(pre.std(-1, unbiased=False).mean())

    # ---- attention ---------------------------------------------------------------------------
    def _attention(self, acts, x_seq, xm, be1) -> torch.Tensor | None:
        """Map the attention block: returns the stream z after the attention-output norm (None without data)."""
        m = self.m
        kept = torch.argsort(self.head_importance, descending=True, stable=True)[: self.heads].sort().values
        root, inv_root, sv, qk_energy = self._map_query_key(kept, xm)
        ov_energy = self._map_value_output(kept, xm, root, inv_root)
        # the residual path: x enters the stream through the linearised LN1
        set_linear(m.bottleneck.input.dense, self.into_stream, self.Q @ (be1 - self.mu))
        set_identity_norm(m.bottleneck.input.LayerNorm)
        set_identity_norm(m.attention.output.LayerNorm)
        self.report["attention"] = {
            "heads_kept": kept.tolist(),
            "importance_kept": float(self.head_importance[kept].sum() / self.head_importance.sum().clamp_min(1e-30)),
            "qk_bottleneck_energy": float((sv[: self.b] ** 2).sum() / (sv ** 2).sum().clamp_min(1e-30)),
            "qk_energy_per_head": qk_energy, "ov_energy_per_head": ov_energy}
        if acts is None:
            return None
        context, layer_input, target = self._refit_attention_output(acts, x_seq, xm)
        return self._fit_attention_norm(context, layer_input, target)

    def _qk_basis(self, g, xm):
        """The shared query/key bottleneck in whitened input coordinates: the b directions that best preserve
        the kept heads' q and k rows `g` (g·root's top right singular vectors). When the heads span fewer than
        b directions (small heads: 2 × head size × kept heads < b), the input's next principal directions fill
        the rest, so the basis is always b well-defined, deterministic directions.
        Returns (root, inv_root, basis (H × b), singular values)."""
        m2 = linalg.second_moment(xm, self.H)
        root, inv_root = linalg.sqrt_and_inv_sqrt(m2)
        _, sv, vt = torch.linalg.svd(g @ root, full_matrices=False)
        keep = linalg.significant(sv[: self.b], sv)
        # the plain view when the heads fill b: a copied (contiguous) basis would change BLAS's last bits
        basis = vt[: self.b].T if len(keep) == self.b and bool(keep.all()) else vt[: self.b][keep].T
        if basis.shape[1] < self.b:  # whitening keeps m2's eigenvectors: they are the input's principal axes
            vals, vecs = torch.linalg.eigh(m2)
            principal = vecs[:, torch.argsort(vals, descending=True, stable=True)]
            basis = linalg.complete_basis(basis, self.b, principal)
        return root, inv_root, basis, sv

    def _map_query_key(self, kept, xm):
        """The shared q/k bottleneck (bottleneck.attention) and each kept head's query·key bilinear form,
        projected into it and truncated by SVD to dd. Returns (root, inv_root, sv, per-head energy kept)."""
        t, m, d, dd = self.t, self.m, self.d, self.d_out
        wq, bq = self.w(t.attention.self.query)
        wk, _ = self.w(t.attention.self.key)
        g = torch.cat([torch.cat([wq[self.rows(j)], wk[self.rows(j)]]) for j in kept.tolist()])
        root, inv_root, basis, sv = self._qk_basis(g, xm)
        reduce, expand = basis.T @ inv_root, root @ basis  # u = reduce·x, x ≈ expand·u
        set_linear(m.bottleneck.attention.dense, reduce, None)
        set_identity_norm(m.bottleneck.attention.LayerNorm)
        wq_new, bq_new = torch.zeros(self.b, self.b, dtype=F64), torch.zeros(self.b, dtype=F64)
        wk_new = torch.zeros_like(wq_new)
        scale = math.sqrt(dd) / math.sqrt(d)  # BERT scores divide by √d, MobileBERT's by √d_out
        qk_energy = []
        for slot, j in enumerate(kept.tolist()):
            qj, kj = wq[self.rows(j)] @ expand, wk[self.rows(j)] @ expand  # (d, b)
            left, right, e = linalg.low_rank(qj.T @ kj * scale, dd)  # scores ≈ uᵢᵀ·left·right·uⱼ
            out_rows = slice(slot * dd, (slot + 1) * dd)
            wq_new[out_rows], wk_new[out_rows] = left.T, right
            # the query bias adds bqᵀ·W_k·x_j to every score of key j: keep it through the new key map
            bq_new[out_rows] = torch.linalg.lstsq(right.T, (bq[self.rows(j)] @ kj) * scale).solution
            qk_energy.append(e)
        set_linear(m.attention.self.query, wq_new, bq_new)
        set_linear(m.attention.self.key, wk_new, None)
        return root, inv_root, sv, qk_energy

    def _map_value_output(self, kept, xm, root, inv_root) -> list[float]:
        """Each kept head's value·output product into the stream (ov), truncated by SVD to dd in whitened
        input coordinates; value and output biases, and the dropped heads' average output, go into the output
        projection's bias. Returns the per-head energy kept."""
        t, m, dd = self.t, self.m, self.d_out
        wv, bv = self.w(t.attention.self.value)
        wo, bo = self.w(t.attention.output.dense)
        wv_new, wo_new = torch.zeros(self.b, self.H, dtype=F64), torch.zeros(self.b, self.b, dtype=F64)
        ov_energy = []
        bias = bo.clone()
        for slot, j in enumerate(kept.tolist()):
            out_rows = slice(slot * dd, (slot + 1) * dd)
            ov = self.into_stream @ wo[:, self.rows(j)] @ wv[self.rows(j)]  # (b, H), value→stream product
            left, right, e = linalg.low_rank(ov @ root, dd)
            wo_new[:, out_rows], wv_new[out_rows] = left, right @ inv_root
            ov_energy.append(e)
            bias = bias + wo[:, self.rows(j)] @ bv[self.rows(j)]
        mean_x = xm.to(F64).mean(0) if xm is not None else torch.zeros(self.H, dtype=F64)
        for j in sorted(set(range(self.A)) - set(kept.tolist())):  # a dropped head's average output
            bias = bias + wo[:, self.rows(j)] @ (wv[self.rows(j)] @ mean_x + bv[self.rows(j)])
        set_linear(m.attention.self.value, wv_new, None)
        set_linear(m.attention.output.dense, wo_new, self.into_stream @ bias)
        return ov_energy

    def _refit_attention_output(self, acts, x_seq, xm):
        """Refit the output projection and the input bottleneck jointly on the MobileBERT's own input, to the
        stream target Q·(s − μ). Returns (context, layer_input, target) for the attention-output norm."""
        m = self.m
        layer_norm = self.mc.normalization_type == "layer_norm"
        if layer_norm:  # a LayerNorm cannot be the identity: fit it to pass its input through
            linalg.fit_norm(m.bottleneck.attention.LayerNorm, projected := m.bottleneck.attention.dense(xm), projected)
        u = m.bottleneck.attention(x_seq)
        context = acts.flat(m.attention.self(u, u, x_seq, attention_mask=acts.mask4d)[0])
        target = (acts.s.to(F64) - self.mu) @ self.Q.T
        weight, bias_fit, _ = linalg.lstsq(torch.cat([context, xm], 1), target, self.cfg.ridge)
        set_linear(m.attention.output.dense, weight[:, : self.b], bias_fit)
        set_linear(m.bottleneck.input.dense, weight[:, self.b:], None)
        layer_input = m.bottleneck.input(xm)
        if layer_norm:  # same for the input bottleneck, then refit the output projection around it
            linalg.fit_norm(m.bottleneck.input.LayerNorm, projected := m.bottleneck.input.dense(xm), projected)
            layer_input = m.bottleneck.input(xm)
            weight, bias_fit, _ = linalg.lstsq(context, target - layer_input.to(F64), self.cfg.ridge)
            set_linear(m.attention.output.dense, weight, bias_fit)
        return context, layer_input, target

    def _fit_attention_norm(self, context, layer_input, target) -> torch.Tensor:
        """The attention-output norm, fitted per feature to the stream target; returns the stream z."""
        norm = self.m.attention.output.LayerNorm
        pre = self.m.attention.output.dense(context) + layer_input
        self.report["attention"]["fit_r2"] = linalg.fit_norm(norm, pre, target)
        return norm(pre)

    # ---- feed-forward networks ---------------------------------------------------------------
    def _ffns(self, z, s, w1, b1) -> torch.Tensor | None:
        """Split the source's FFN neurons into the N stacked FFNs (balanced importance); returns z_ffn."""
        t, m, mc = self.t, self.m, self.mc
        w2, b2 = self.w(t.output.dense)
        n, size = mc.num_feedforward_networks, mc.intermediate_size
        groups = linalg.balanced_groups(self.neuron_importance, n, size)
        blocks = [(f.intermediate.dense, f.output.dense, f.output.LayerNorm) for f in m.ffn] if n > 1 else []
        blocks.append((m.intermediate.dense, m.output.dense, m.output.LayerNorm))
        total = float(self.neuron_importance.sum().clamp_min(1e-30))
        pre_all = s.to(F64) @ w1.T + b1 if s is not None else None
        partial = s.to(F64) if s is not None else None  # the source's state after the FFN groups so far
        report = {"neurons_kept": sum(len(g) for g in groups), "neurons_total": int(w1.shape[0]),
                  "importance_share_per_ffn": [], "relu_fit_r2": [], "fit_r2": []}
        for k, (group, block) in enumerate(zip(groups, blocks)):
            idx = torch.tensor(group, dtype=torch.long)
            report["importance_share_per_ffn"].append(float(self.neuron_importance[idx].sum()) / total)
            last = k == len(blocks) - 1
            a, c = self._relu_calibration(pre_all[:, idx] if pre_all is not None else None, len(group), report)
            w_up, b_up = self._map_ffn(k, block, idx, a, c, (w1, b1), (w2, b2 if last else None))
            if z is None:
                continue
            partial = partial + self.t.intermediate.intermediate_act_fn(pre_all[:, idx].float()).to(F64) @ w2[:, idx].T
            if last:
                partial = partial + b2
            z = self._refit_ffn(z, block, w_up, b_up, a * pre_all[:, idx] + c, (partial - self.mu) @ self.Q.T, report)
        self.report["ffn"] = report
        return z

    def _relu_calibration(self, pre, n: int, report: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-neuron a, c with relu(a·p + c) ≈ act(p) (the source's GELU); a = 1, c = 0 for a GELU target or
        without data."""
        if self.mc.hidden_act == "relu" and pre is not None:
            a, c, fit = linalg.relu_calibration(pre, self.t.intermediate.intermediate_act_fn)
            report["relu_fit_r2"].append(fit)
            return a.to(F64), c.to(F64)
        return torch.ones(n, dtype=F64), torch.zeros(n, dtype=F64)

    def _map_ffn(self, k, block, idx, a, c, first, second) -> tuple[torch.Tensor, torch.Tensor]:
        """FFN block k from the source's neurons `idx` in stream coordinates (data-free). `first` = (w1, b1),
        `second` = (w2, b2 or None: only the last block adds b2). Returns the up-projection (w_up, b_up)."""
        up, down, norm = block
        (w1, b1), (w2, b2) = first, second
        size, live = self.mc.intermediate_size, slice(0, len(idx))
        w_up = torch.zeros(size, self.b, dtype=F64)
        b_up = torch.zeros(size, dtype=F64)
        w_down = torch.zeros(self.b, size, dtype=F64)
        w_up[live] = a[:, None] * (w1[idx] @ self.Q.T)
        b_up[live] = a * (b1[idx] + w1[idx] @ self.mu) + c
        w_down[:, live] = self.Q @ w2[:, idx]
        if len(idx) < size:  # spare slots: small random inputs, zero outputs (trainable, inert now)
            w_up[len(idx):] = torch.randn(size - len(idx), self.b, dtype=F64,
                                          generator=torch.Generator().manual_seed(self.cfg.seed + k)) * 0.02
        set_linear(up, w_up, b_up)
        set_linear(down, w_down, self.Q @ b2 if b2 is not None else None)
        set_identity_norm(norm)
        return w_up, b_up

    def _refit_ffn(self, z, block, w_up, b_up, target_pre, target, report) -> torch.Tensor:
        """Refit one FFN block on the MobileBERT's own stream z: first the neurons' (calibrated)
        pre-activations, then the down-projection and norm to the stream target. Returns the new z."""
        up, down, norm = block
        live = slice(0, target_pre.shape[1])
        wfit, bfit, _ = linalg.lstsq(z, target_pre, self.cfg.ridge)
        w_up[live], b_up[live] = wfit, bfit
        set_linear(up, w_up, b_up)
        hidden = self.act(up(z))
        wfit, bfit, _ = linalg.lstsq(hidden, target - z.to(F64), self.cfg.ridge)
        set_linear(down, wfit, bfit)
        pre = down(hidden) + z
        report["fit_r2"].append(linalg.fit_norm(norm, pre, target))
        return norm(pre)

    # ---- output bottleneck -------------------------------------------------------------------
    def _output(self, acts, z_ffn, xm, scale2, be2, centre) -> torch.Tensor | None:
        """The up-projection back to H (+xm) and its norm; alternating fits for NoNorm. Returns out."""
        up, norm = self.m.output.bottleneck.dense, self.m.output.bottleneck.LayerNorm
        # linearised LN2: out ≈ γ₂/σ̄₂ ⊙ centre(Qᵀ·z + μ) + β₂
        weight = torch.diag(scale2) @ centre @ self.Q.T
        set_linear(up, weight, torch.diag(scale2) @ centre @ self.mu + be2)
        set_identity_norm(norm)
        if z_ffn is None:
            return None
        target = acts.out.to(F64)
        goal = target - xm.to(F64)
        for _ in range(2):  # alternate: projection given the norm, norm given the projection
            wfit, bfit, _ = linalg.lstsq(z_ffn, goal, self.cfg.ridge)
            set_linear(up, wfit, bfit)
            fit = linalg.fit_norm(norm, up(z_ffn) + xm, target)
            if self.mc.normalization_type != "no_norm":
                break
            scale = norm.weight.to(F64)
            scale = torch.where(scale.abs() < 1e-3, torch.ones_like(scale), scale)
            goal = (target - norm.bias.to(F64)) / scale - xm.to(F64)  # what up(t) must be under this norm
        self.report["output_fit_r2"] = fit
        return norm(up(z_ffn) + xm)
