"""Hugging Face ELECTRA discriminator names (ElectraModel / ElectraForSequenceClassification).

The encoder layers are BERT's under BERT's names. Two differences: a factorised embedding (tables and LayerNorm
of width embedding_size, then `embeddings_project` to the hidden size, absent when the widths are equal) and a
head of dense → GELU → out_proj on the first token (canonical: the pooler with a GELU, `mbconvert.canonical`).
"""

FAMILY = "electra"
MODEL_TYPES = ("electra",)
MARKER = r"^electra\.embeddings\.word_embeddings\.weight$|^embeddings_project\.weight$"  # bare ElectraModel
_L = r"(?:electra\.)?encoder\.layer\.(\d+)\."
KEY_MAP = [
    (r"(?:electra\.)?embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"bert.embeddings.\1.weight"),
    (r"(?:electra\.)?embeddings\.LayerNorm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
    (r"(?:electra\.)?embeddings_project\.(weight|bias)", r"bert.embeddings.projection.\1"),
    (_L + r"(attention\.self\.(?:query|key|value)|attention\.output\.(?:dense|LayerNorm)|intermediate\.dense|"
          r"output\.(?:dense|LayerNorm))\.(weight|bias)", r"bert.encoder.layer.\1.\2.\3"),
    (r"classifier\.dense\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"classifier\.out_proj\.(weight|bias)", r"classifier.\1"),
    (r"(?:electra\.)?embeddings\.(position_ids|token_type_ids)", r"ignored.\1"),
]
HEAD_ACTIVATION = "gelu"
