"""Per-source-family weight-name maps, installed as ``mbconvert.adapters``.

Each family is one small module with data only:

- ``FAMILY``: its name; ``MARKER``: a regex that only this family's keys match;
- ``KEY_MAP``: ``(source regex, canonical template)`` pairs. The canonical names are Hugging Face
  ``BertForSequenceClassification``'s (``bert.embeddings.*``, ``bert.encoder.layer.N.*``,
  ``bert.pooler.dense.*``, ``classifier.*``);
- ``TRANSFORMS``: optional ``{canonical regex: function}`` for tensors that need more than a rename
  (UER's segment table has a padding row; RoBERTa's positions start at padding_idx + 1);
- ``complete(tensors, config)``: optional, for what a name map cannot say (ALBERT's shared layer unrolled per
  depth, DistilBERT's missing token-type table);
- ``CONFIG_NAMES``: optional ``{family's config.json field: BERT's}`` (DistilBERT's dim, n_layers, …);
- ``HEAD_ACTIVATION``: the head's activation when it is not tanh (DistilBERT relu, ELECTRA gelu; see
  ``mbconvert.canonical``).

Adding a family means adding a module here and its name to ``FAMILIES``; the converter is not edited.
"""

from __future__ import annotations

import re

from . import albert, bert, distilbert, electra, roberta, uer

# checked in this order; bert is the fallback for bare HF names
FAMILIES = [uer, roberta, distilbert, electra, albert, bert]
STRIP_PREFIXES = ("module.", "model.")


def strip_wrappers(keys_to_tensors: dict) -> dict:
    """Drop DataParallel/Lightning wrapper prefixes (module., model.)."""
    out = {}
    for k, v in keys_to_tensors.items():
        changed = True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if k.startswith(p) and not k.startswith("model_"):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def detect(keys, model_type: str | None = None):
    """The family whose MARKER matches the keys (config model_type breaks ties), or None."""
    keys = list(keys)
    if model_type:
        for fam in FAMILIES:
            if model_type in getattr(fam, "MODEL_TYPES", ()) and any(re.search(fam.MARKER, k) for k in keys):
                return fam
    for fam in FAMILIES:
        if any(re.search(fam.MARKER, k) for k in keys):
            return fam
    return None


def known() -> str:
    """The families' names, for messages."""
    return ", ".join(f.FAMILY for f in FAMILIES)


def config_in_bert_names(config: dict, family) -> dict:
    """A config.json's fields under BERT's names (a family's own names win over stale BERT-named copies)."""
    out = dict(config)
    for theirs, ours in getattr(family, "CONFIG_NAMES", {}).items():
        if theirs in config:
            out[ours] = config[theirs]
    return out


def to_canonical(state_dict: dict, family, config: dict | None = None) -> tuple[dict, list[str]]:
    """Rename (transform, complete) a family's keys to canonical names; returns (tensors, unmapped keys).
    `config`: the source's config.json in BERT's names (ALBERT's depth comes from it)."""
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        for pattern, template in family.KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(template)] = tensor
                break
        else:
            unmapped.append(key)
    for pattern, fn in getattr(family, "TRANSFORMS", {}).items():
        for key in list(out):
            if re.fullmatch(pattern, key):
                out[key] = fn(out[key])
    if hasattr(family, "complete"):
        out = family.complete(out, config or {})
    return out, unmapped
