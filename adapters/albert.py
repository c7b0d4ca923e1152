"""Hugging Face ALBERT names (AlbertModel / AlbertForSequenceClassification).

ALBERT's layer is BERT's post-LN layer under other names, but one set of weights (a layer group) is applied at
every depth: `complete` unrolls it into num_hidden_layers BERT layers (layer i uses group i·groups/layers;
one layer per group, as every released ALBERT has), so downstream code sees an ordinary deep encoder. The depth is not in the
weights: it comes from config.json (or --layers for a bare state dict). The embedding is factorised (tables and
LayerNorm of width embedding_size, then `embedding_hidden_mapping_in` to the hidden size). The head is BERT's
(pooler → tanh → classifier).
"""

import re

from ..errors import UnknownArchitectureError

FAMILY = "albert"
MODEL_TYPES = ("albert",)
MARKER = r"^(albert\.)?encoder\.albert_layer_groups\.0\.albert_layers\.0\."
_G = r"(?:albert\.)?encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\."
_S = r"shared.\1.\2."
KEY_MAP = [
    (r"(?:albert\.)?embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"bert.embeddings.\1.weight"),
    (r"(?:albert\.)?embeddings\.LayerNorm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
    (r"(?:albert\.)?encoder\.embedding_hidden_mapping_in\.(weight|bias)", r"bert.embeddings.projection.\1"),
    (_G + r"attention\.(query|key|value)\.(weight|bias)", _S + r"attention.self.\3.\4"),
    (_G + r"attention\.dense\.(weight|bias)", _S + r"attention.output.dense.\3"),
    (_G + r"attention\.LayerNorm\.(weight|bias)", _S + r"attention.output.LayerNorm.\3"),
    (_G + r"ffn\.(weight|bias)", _S + r"intermediate.dense.\3"),
    (_G + r"ffn_output\.(weight|bias)", _S + r"output.dense.\3"),
    (_G + r"full_layer_layer_norm\.(weight|bias)", _S + r"output.LayerNorm.\3"),
    (r"(?:albert\.)?pooler\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"(?:albert\.)?embeddings\.(position_ids|token_type_ids)", r"ignored.\1"),
]
MAX_DEPTH = 1024


def complete(tensors: dict, config: dict) -> dict:
    """Unroll the shared layer groups into config's num_hidden_layers BERT layers (tensors are shared, not copied:
    the canonical model's load_state_dict copies them into separate parameters)."""
    shared = {}
    for key in [k for k in tensors if k.startswith("shared.")]:
        group, inner, name = re.match(r"shared\.(\d+)\.(\d+)\.(.+)", key).groups()
        shared.setdefault(int(group), {}).setdefault(int(inner), {})[name] = tensors.pop(key)
    if not shared:
        return tensors
    depth = config.get("num_hidden_layers")
    if depth is None:
        raise UnknownArchitectureError("ALBERT applies one shared layer at every depth and the weights do not say how "
                                       "many: put its config.json beside the weights or pass --layers N")
    if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise UnknownArchitectureError(f"ALBERT depth {depth!r} must be an integer in 1..{MAX_DEPTH}")
    groups = sorted(shared)
    if groups != list(range(len(groups))) or depth % len(groups):
        raise UnknownArchitectureError(f"ALBERT layer groups {groups} cannot be spread over {depth} layers")
    if any(sorted(shared[g]) != [0] for g in groups):
        raise UnknownArchitectureError("ALBERT with several layers per group (inner_group_num > 1) is not supported")
    for i in range(depth):  # HF AlbertTransformer: layer i uses group int(i / (layers / groups))
        for name, t in shared[i * len(groups) // depth][0].items():
            tensors[f"bert.encoder.layer.{i}.{name}"] = t
    return tensors
