"""Hugging Face DistilBERT names (DistilBertModel / DistilBertForSequenceClassification).

DistilBERT is BERT's post-LN layer under other names (q_lin/k_lin/v_lin/out_lin, sa_layer_norm, ffn.lin1/lin2,
output_layer_norm) with two differences: no token-type table (canonical: one all-zero row, which adds nothing)
and a head of pre_classifier → ReLU → classifier on the first token instead of BERT's pooler → tanh (canonical:
the pooler with a ReLU, `mbconvert.canonical`). Its config.json uses its own field names (dim, n_layers, …).
"""

import torch

FAMILY = "distilbert"
MODEL_TYPES = ("distilbert",)
MARKER = r"^(distilbert\.)?transformer\.layer\.0\.attention\.q_lin\.weight$"
_L = r"(?:distilbert\.)?transformer\.layer\.(\d+)\."
_C = r"bert.encoder.layer.\1."
KEY_MAP = [
    (r"(?:distilbert\.)?embeddings\.(word_embeddings|position_embeddings)\.weight", r"bert.embeddings.\1.weight"),
    (r"(?:distilbert\.)?embeddings\.LayerNorm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
    (_L + r"attention\.q_lin\.(weight|bias)", _C + r"attention.self.query.\2"),
    (_L + r"attention\.k_lin\.(weight|bias)", _C + r"attention.self.key.\2"),
    (_L + r"attention\.v_lin\.(weight|bias)", _C + r"attention.self.value.\2"),
    (_L + r"attention\.out_lin\.(weight|bias)", _C + r"attention.output.dense.\2"),
    (_L + r"sa_layer_norm\.(weight|bias)", _C + r"attention.output.LayerNorm.\2"),
    (_L + r"ffn\.lin1\.(weight|bias)", _C + r"intermediate.dense.\2"),
    (_L + r"ffn\.lin2\.(weight|bias)", _C + r"output.dense.\2"),
    (_L + r"output_layer_norm\.(weight|bias)", _C + r"output.LayerNorm.\2"),
    (r"pre_classifier\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"(?:distilbert\.)?embeddings\.position_ids", "ignored.position_ids"),
]
HEAD_ACTIVATION = "relu"
# config.json field names → BERT's
CONFIG_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "hidden_dim": "intermediate_size", "activation": "hidden_act"}


def complete(tensors: dict, config: dict) -> dict:
    """Add the token-type table DistilBERT does not have: one row of zeros (every token is type 0)."""
    word = tensors.get("bert.embeddings.word_embeddings.weight")
    if word is not None:
        tensors["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, word.shape[1], dtype=word.dtype)
    return tensors
