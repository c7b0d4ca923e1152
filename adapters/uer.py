"""UER-py native names (what `uer/chinese_roberta_L-*_H-*` students are trained and saved in).

Both UER generations are covered (`embedding.word_embedding` and `embedding.word.embedding`;
`layer_norm.gamma/beta` and `.weight/.bias`). UER's segment table has a padding row 0, so canonical
token type t is UER's row t + 1. A run_classifier.py head is output_layer_1 (dense, tanh on the first
token) and output_layer_2: BERT's pooler + classifier.
"""

FAMILY = "uer"
MODEL_TYPES = ()
MARKER = r"^embedding\.(word_embedding|word\.embedding)\.weight$"
_L = r"encoder\.transformer\.(\d+)\."
_G, _B = r"(?:gamma|weight)", r"(?:beta|bias)"
KEY_MAP = [
    (r"embedding\.(?:word_embedding|word\.embedding)\.weight", "bert.embeddings.word_embeddings.weight"),
    (r"embedding\.(?:position_embedding|pos\.embedding)\.weight", "bert.embeddings.position_embeddings.weight"),
    (r"embedding\.(?:segment_embedding|seg\.embedding)\.weight", "bert.embeddings.token_type_embeddings.weight"),
    (r"embedding\.layer_norm\." + _G, "bert.embeddings.LayerNorm.weight"),
    (r"embedding\.layer_norm\." + _B, "bert.embeddings.LayerNorm.bias"),
    (_L + r"self_attn\.linear_layers\.0\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.query.\2"),
    (_L + r"self_attn\.linear_layers\.1\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.key.\2"),
    (_L + r"self_attn\.linear_layers\.2\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.value.\2"),
    (_L + r"self_attn\.final_linear\.(weight|bias)", r"bert.encoder.layer.\1.attention.output.dense.\2"),
    (_L + r"layer_norm_1\." + _G, r"bert.encoder.layer.\1.attention.output.LayerNorm.weight"),
    (_L + r"layer_norm_1\." + _B, r"bert.encoder.layer.\1.attention.output.LayerNorm.bias"),
    (_L + r"feed_forward\.linear_1\.(weight|bias)", r"bert.encoder.layer.\1.intermediate.dense.\2"),
    (_L + r"feed_forward\.linear_2\.(weight|bias)", r"bert.encoder.layer.\1.output.dense.\2"),
    (_L + r"layer_norm_2\." + _G, r"bert.encoder.layer.\1.output.LayerNorm.weight"),
    (_L + r"layer_norm_2\." + _B, r"bert.encoder.layer.\1.output.LayerNorm.bias"),
    (r"output_layer_1\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"output_layer_2\.(weight|bias)", r"classifier.\1"),
    (r"target\.nsp_linear_1\.(weight|bias)", r"bert.pooler.dense.\1"),  # pre-training checkpoints
]
SEGMENT_PADDING_ROWS = 1
TRANSFORMS = {r"bert\.embeddings\.token_type_embeddings\.weight": lambda w: w[SEGMENT_PADDING_ROWS:]}
