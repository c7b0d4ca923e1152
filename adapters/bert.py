"""Hugging Face BERT names (BertModel / BertForSequenceClassification; `bert.` prefix optional).

Also covers TF-era `LayerNorm.gamma/beta` names and a RoBERTa-style head (dense + out_proj) put on a
BERT body, which is the same function as BERT's pooler + classifier.
"""

FAMILY = "bert"
MODEL_TYPES = ("bert",)
MARKER = r"^(bert\.)?(embeddings\.word_embeddings|encoder\.layer\.0\.attention\.self\.query)"
_L = r"(?:bert\.)?encoder\.layer\.(\d+)\."
KEY_MAP = [
    (r"(?:bert\.)?embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"bert.embeddings.\1.weight"),
    (r"(?:bert\.)?embeddings\.LayerNorm\.(?:weight|gamma)", "bert.embeddings.LayerNorm.weight"),
    (r"(?:bert\.)?embeddings\.LayerNorm\.(?:bias|beta)", "bert.embeddings.LayerNorm.bias"),
    (_L + r"attention\.self\.(query|key|value)\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.\2.\3"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"bert.encoder.layer.\1.attention.output.dense.\2"),
    (_L + r"attention\.output\.LayerNorm\.(?:weight|gamma)", r"bert.encoder.layer.\1.attention.output.LayerNorm.weight"),
    (_L + r"attention\.output\.LayerNorm\.(?:bias|beta)", r"bert.encoder.layer.\1.attention.output.LayerNorm.bias"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"bert.encoder.layer.\1.intermediate.dense.\2"),
    (_L + r"output\.dense\.(weight|bias)", r"bert.encoder.layer.\1.output.dense.\2"),
    (_L + r"output\.LayerNorm\.(?:weight|gamma)", r"bert.encoder.layer.\1.output.LayerNorm.weight"),
    (_L + r"output\.LayerNorm\.(?:bias|beta)", r"bert.encoder.layer.\1.output.LayerNorm.bias"),
    (r"(?:bert\.)?pooler\.dense\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"classifier\.dense\.(weight|bias)", r"bert.pooler.dense.\1"),  # RoBERTa-style head on a BERT body
    (r"classifier\.out_proj\.(weight|bias)", r"classifier.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"(?:bert\.)?embeddings\.position_ids", "ignored.position_ids"),
]
