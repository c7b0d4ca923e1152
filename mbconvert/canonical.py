"""The canonical source model every family is loaded into: Hugging Face BertForSequenceClassification, with the two
variations that other families' functions need and a name map cannot express.

- A factorised embedding (ELECTRA, ALBERT): word, position and token-type tables of width E, a LayerNorm of width
  E, then a linear projection E → H (ELECTRA's ``embeddings_project``, ALBERT's ``embedding_hidden_mapping_in``).
  Config field ``embedding_size``; the projection is ``bert.embeddings.projection``.
- The head's activation (config field ``pooler_activation``): BERT, RoBERTa, UER and ALBERT put tanh after the
  pooler's dense layer, DistilBERT ReLU (its ``pre_classifier``), ELECTRA GELU (``classifier.dense``).

Everything else (post-LN layers of self-attention and a GELU FFN) is BERT's layer in every family, so the
converter, the recovery loop and the checks read one model interface. With neither variation the canonical model
is a plain BertForSequenceClassification (`canonical_class`), so BERT-family sources are what they always were.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertEmbeddings

HEAD_ACTIVATIONS = ("tanh", "relu", "gelu")


class FactorisedEmbeddings(BertEmbeddings):
    """BERT's embeddings at width E (sum of three tables, LayerNorm, dropout), then a projection to the hidden size."""

    def __init__(self, config: BertConfig):
        narrow = copy.copy(config)
        narrow.hidden_size = config.embedding_size
        super().__init__(narrow)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size)

    def forward(self, *args, **kwargs):
        return self.projection(super().forward(*args, **kwargs))


class SourceClassifier(BertForSequenceClassification):
    """BertForSequenceClassification, with a factorised embedding when ``config.embedding_size`` is set and the head
    activation ``config.pooler_activation`` (default tanh)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        if is_factorised(config):
            self.bert.embeddings = FactorisedEmbeddings(config)
        act = head_activation(config)
        if act != "tanh":
            self.bert.pooler.activation = ACT2FN[act]


def canonical_class(config) -> type[BertForSequenceClassification]:
    """SourceClassifier when the config needs a variation, else BertForSequenceClassification itself."""
    return SourceClassifier if is_factorised(config) or head_activation(config) != "tanh" else BertForSequenceClassification


def is_factorised(config) -> bool:
    return getattr(config, "embedding_size", None) is not None


def head_activation(config) -> str:
    return getattr(config, "pooler_activation", None) or "tanh"


def as_bert(model: SourceClassifier) -> BertForSequenceClassification:
    """The same model as a plain BertForSequenceClassification (what a saved folder must be for AutoModel to load
    it); a factorised embedding or a non-tanh head has no BERT equivalent."""
    from .errors import UnknownArchitectureError

    if type(model) is BertForSequenceClassification:
        return model
    if is_factorised(model.config) or head_activation(model.config) != "tanh":
        raise UnknownArchitectureError("this source (factorised embedding or a non-tanh head: ELECTRA, ALBERT, "
                                       "DistilBERT) cannot be written as a BERT folder; pruning its vocabulary "
                                       "is supported inside the conversion (--prune-vocab) only")
    bert = BertForSequenceClassification(model.config)
    bert.load_state_dict(model.state_dict())
    return bert.eval()
