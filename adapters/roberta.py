"""Hugging Face RoBERTa names (RobertaModel / RobertaForSequenceClassification).

RoBERTa numbers positions from padding_idx + 1 = 2, so canonical position p is RoBERTa's row p + 2
(exact for right-padded input, which is what tokenizers produce). Its head (dense → tanh → out_proj on
the first token) is BERT's pooler + classifier under other names.
"""

FAMILY = "roberta"
MODEL_TYPES = ("roberta", "xlm-roberta")
MARKER = r"^roberta\.embeddings\.word_embeddings"
_L = r"roberta\.encoder\.layer\.(\d+)\."
KEY_MAP = [
    (r"roberta\.embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"bert.embeddings.\1.weight"),
    (r"roberta\.embeddings\.LayerNorm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
    (_L + r"attention\.self\.(query|key|value)\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.\2.\3"),
    (_L + r"attention\.output\.(dense|LayerNorm)\.(weight|bias)", r"bert.encoder.layer.\1.attention.output.\2.\3"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"bert.encoder.layer.\1.intermediate.dense.\2"),
    (_L + r"output\.(dense|LayerNorm)\.(weight|bias)", r"bert.encoder.layer.\1.output.\2.\3"),
    (r"roberta\.pooler\.dense\.(weight|bias)", r"unused.pooler.\1"),  # the classification head has its own dense
    (r"classifier\.dense\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"classifier\.out_proj\.(weight|bias)", r"classifier.\1"),
    (r"roberta\.embeddings\.(position_ids|token_type_ids)", r"ignored.\1"),
]
PADDING_OFFSET = 2
TRANSFORMS = {r"bert\.embeddings\.position_embeddings\.weight": lambda w: w[PADDING_OFFSET:]}
