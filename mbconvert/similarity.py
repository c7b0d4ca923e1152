"""Compare two classifiers on the same batches: logits, per-layer hidden-state and attention similarity.

Shared by the adapter's conversion report, the CompatibilityTestSuite and recovery's evaluation. Layer l
of one model is compared with layer l of the other (both have the source's layer count); hidden states
live in the same inter-block width. Attention maps are compared head-averaged, which is defined for
different head counts; the KL is mbconvert.losses.masked_row_kl (summed over real query rows here, then divided
by their count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import Encoded
from .losses import log_probs, masked_row_kl


@dataclass
class Comparison:
    logits_a: torch.Tensor
    logits_b: torch.Tensor
    layer_cosine: list[float] = field(default_factory=list)  # index 0 = embeddings output
    layer_rel_mse: list[float] = field(default_factory=list)  # ||a−b||² / ||a||², token-averaged
    attention_kl: list[float] = field(default_factory=list)  # KL(head-avg A_a ‖ head-avg A_b), per layer
    attention_js: list[float] = field(default_factory=list)  # Jensen–Shannon (bounded, symmetric)

    @property
    def agreement(self) -> float:
        return float((self.logits_a.argmax(-1) == self.logits_b.argmax(-1)).float().mean())


def inputs_for(model, batch: dict) -> dict:
    """The batch's model inputs (no labels; no token types for a model without them, e.g. DistilBERT)."""
    skip = {"labels"} | ({"token_type_ids"} if getattr(model.config, "model_type", None) == "distilbert" else set())
    return {k: v for k, v in batch.items() if k not in skip}


def _forward(model, batch, hidden: bool, attentions: bool):
    return model(**inputs_for(model, batch), output_hidden_states=hidden, output_attentions=attentions)


@torch.no_grad()
def predict_logits(model, encoded: Encoded, batch_size: int = 64, device=None, desc: str = "") -> torch.Tensor:
    """Logits for every row in file order, computed shortest rows first (least padding). Leaves the model in
    eval mode; `device`: where the batches go (default: where they are); `desc`: show a progress bar."""
    from tqdm.auto import tqdm

    model.eval()
    order = encoded.length_order()
    batches = encoded.batches(batch_size, order=order)
    if desc:
        batches = tqdm(batches, total=-(-len(encoded) // batch_size), desc=desc, unit="batch", leave=False)
    logits = torch.cat([_forward(model, {k: v.to(device) for k, v in b.items()} if device is not None else b,
                                 False, False).logits.float() for b in batches])
    return logits[torch.argsort(order).to(logits.device)]


@torch.no_grad()
def compare(model_a, model_b, encoded: Encoded, batch_size: int = 32, layers: bool = True,
            attentions: bool = True) -> Comparison:
    """Run both models over `encoded`; similarity is averaged over real (non-padding) tokens."""
    model_a.eval()
    model_b.eval()
    la, lb = [], []
    cos_sum = mse_sum = kl_sum = js_sum = None
    tokens = rows = 0.0
    for batch in encoded.batches(batch_size):
        oa = _forward(model_a, batch, layers, attentions)
        ob = _forward(model_b, batch, layers, attentions)
        la.append(oa.logits.float())
        lb.append(ob.logits.float())
        mask = batch["attention_mask"].bool()
        if layers:
            ha, hb = oa.hidden_states, ob.hidden_states
            n = min(len(ha), len(hb))
            cos = torch.stack([torch.nn.functional.cosine_similarity(ha[i][mask], hb[i][mask], dim=-1).sum()
                               for i in range(n)])
            mse = torch.stack([(((ha[i] - hb[i]) ** 2).sum(-1)[mask] / (ha[i] ** 2).sum(-1)[mask].clamp_min(1e-12)).sum()
                               for i in range(n)])
            cos_sum = cos if cos_sum is None else cos_sum + cos
            mse_sum = mse if mse_sum is None else mse_sum + mse
            tokens += float(mask.sum())
        if attentions and oa.attentions and ob.attentions:
            n = min(len(oa.attentions), len(ob.attentions))
            kl, js = [], []
            for i in range(n):
                pa = oa.attentions[i].float().mean(1, keepdim=True)  # (B, 1, T, T), head-averaged
                pb = ob.attentions[i].float().mean(1, keepdim=True)
                log_a, log_b, log_m = log_probs(pa), log_probs(pb), log_probs(0.5 * (pa + pb))
                kl.append(masked_row_kl(log_a, log_b, mask, "sum"))
                js.append(0.5 * (masked_row_kl(log_a, log_m, mask, "sum") + masked_row_kl(log_b, log_m, mask, "sum")))
            kl, js = torch.stack(kl), torch.stack(js)
            kl_sum = kl if kl_sum is None else kl_sum + kl
            js_sum = js if js_sum is None else js_sum + js
            rows += float(mask.sum())
    out = Comparison(torch.cat(la), torch.cat(lb))
    if cos_sum is not None:
        out.layer_cosine = (cos_sum / tokens).tolist()
        out.layer_rel_mse = (mse_sum / tokens).tolist()
    if kl_sum is not None:
        out.attention_kl = (kl_sum / rows).tolist()
        out.attention_js = (js_sum / rows).tolist()
    return out

