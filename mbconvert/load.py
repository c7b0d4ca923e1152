"""Stage 1 — load: read a source model in any supported format into one canonical BERT classifier.

Accepted: a state dict (.pt/.bin, with or without bert./roberta./module. prefixes and the head), a safetensors
file, a Hugging Face model folder (config.json + weights + tokenizer), UER-py native names, or an in-memory
transformers model (`source_from_model`), of the families in mbconvert.adapters (BERT, RoBERTa, UER-py,
DistilBERT, ELECTRA, ALBERT). A file's type is read from its bytes, not its name. Everything is renamed to
Hugging Face BertForSequenceClassification's keys, the architecture is inferred from tensor shapes, config.json is
checked against them, every shape is asserted, and the canonical classifier is built: BertForSequenceClassification,
or mbconvert.canonical.SourceClassifier where the family has a factorised embedding or another head activation.
Nothing is unpickled beyond weights_only=True, and declared tensor sizes are checked against the file before
anything is materialised (mbconvert.safeload.safe_torch_load).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from . import adapters
from .canonical import canonical_class
from .errors import (CorruptFileError, NonFiniteWeightsError, ShapeMismatchError, TokenizerError,
                     UnknownArchitectureError)
from .safeload import safe_torch_load, weights_format
from .sourceconfig import (check_config_matches, class_names, label_names_for, parse_id2label,
                           read_config, read_label_names, validate_config)

log = logging.getLogger("mbconvert")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
HEAD_KEYS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias")
# far beyond any real model (the largest tokenizers have ~256k entries): a bigger table is corrupt or hostile
MAX_ROWS = {"word_embeddings": 2**20, "position_embeddings": 2**17, "token_type_embeddings": 2**10}


@dataclass
class SourceModel:
    """A loaded source model: the canonical BERT classifier plus what was learned while loading it."""

    model: BertForSequenceClassification  # or its mbconvert.canonical.SourceClassifier subclass
    tokenizer: object | None
    family: str
    has_head: bool
    path: str
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def config(self) -> BertConfig:
        return self.model.config


# ------------------------------------------------------------------------------------------- files
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or PyTorch file, told apart by their bytes whatever the name; one-line
    errors for missing, truncated, corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: no such file")
    if weights_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:  # safetensors checks every tensor's byte range against the file
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError (a Rust type) and OSError
            raise CorruptFileError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
    obj = safe_torch_load(path)
    for wrapper in ("state_dict", "model_state_dict", "model"):  # common training-loop checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise CorruptFileError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict()))")
    return obj


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CorruptFileError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


# ------------------------------------------------------------------------------------------- shapes
def infer_config(sd: dict[str, torch.Tensor], base: dict | None = None, heads: int | None = None,
                 num_labels: int | None = None, names: tuple[list[str], str] | None = None,
                 head_activation: str = "tanh") -> BertConfig:
    """BertConfig from tensor shapes (absurd tables refused before anything is built); `base` (a config.json)
    supplies what shapes cannot (heads, eps, class names); `names` = (class names, where they came from).
    A projection after the embeddings (ELECTRA, ALBERT) makes it factorised (`embedding_size`);
    `head_activation`: the family's (mbconvert.canonical)."""
    base = dict(base or {})
    rows = {}
    for table, limit in MAX_ROWS.items():
        key = f"bert.embeddings.{table}.weight"
        rows[table] = _shape(sd, key, 2)[0]
        if rows[table] < 1:
            raise ShapeMismatchError(f"{key} is empty (after the family's padding rows are removed)")
        if rows[table] > limit:
            raise ShapeMismatchError(f"{key} has {rows[table]} rows, far more than any real model ({limit} at "
                                     "most): refusing a corrupt or hostile file")
    vocab, width = _shape(sd, "bert.embeddings.word_embeddings.weight", 2)
    hidden = _shape(sd, "bert.encoder.layer.0.attention.self.query.weight", 2)[1]
    factorised = "bert.embeddings.projection.weight" in sd
    if width != hidden and not factorised:
        raise ShapeMismatchError(f"the word embeddings are {width} wide but the encoder is {hidden} wide (and no "
                                 "embedding projection was found)")
    intermediate = _shape(sd, "bert.encoder.layer.0.intermediate.dense.weight", 2)[0]
    layers = _layer_count(sd)
    n_heads = heads or base.get("num_attention_heads") or max(1, hidden // 64)
    if hidden % n_heads:
        raise ShapeMismatchError(f"hidden size {hidden} is not divisible by {n_heads} heads (pass --heads)")
    id2label = parse_id2label(base.get("id2label"), "config.json")
    if "classifier.weight" in sd:
        labels = _shape(sd, "classifier.weight", 2)[0]
    else:
        labels = num_labels or (len(names[0]) if names else None) or base.get("num_labels") or len(id2label or {}) or 2
    pad = 1 if base.get("model_type") == "roberta" else base.get("pad_token_id", 0) or 0
    if pad >= vocab:
        raise ShapeMismatchError(f"pad_token_id {pad} is outside the vocabulary of {vocab} tokens")
    cfg = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=n_heads,
        intermediate_size=intermediate, max_position_embeddings=rows["position_embeddings"],
        type_vocab_size=rows["token_type_embeddings"], hidden_act=base.get("hidden_act", "gelu"),
        layer_norm_eps=base.get("layer_norm_eps", 1e-12), pad_token_id=pad, num_labels=labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    if factorised:
        cfg["embedding_size"] = width
    if head_activation != "tanh":
        cfg["pooler_activation"] = head_activation
    names_by_id = class_names(labels, id2label, names)
    if names_by_id:
        cfg["id2label"], cfg["label2id"] = names_by_id, {v: k for k, v in names_by_id.items()}
    config = BertConfig(**cfg)
    config._attn_implementation = "eager"  # recovery and check read attention maps
    return config


def _shape(sd: dict, key: str, dims: int) -> tuple[int, ...]:
    if key not in sd:
        raise UnknownArchitectureError(f"missing tensor {key} after renaming: not a BERT-family encoder")
    if sd[key].dim() != dims:
        raise ShapeMismatchError(f"{key} has shape {tuple(sd[key].shape)}, expected {dims} dimensions")
    return tuple(sd[key].shape)


def _layer_count(sd: dict) -> int:
    """Encoder layers, which must be numbered 0…n-1."""
    found = [m.group(1) for k in sd if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))]
    if any(len(i) > 6 for i in found):
        raise UnknownArchitectureError("an encoder layer number has more than 6 digits: not a real checkpoint")
    indices = {int(i) for i in found}
    if not indices:
        raise UnknownArchitectureError("no encoder layers found")
    if indices != set(range(len(indices))):
        raise UnknownArchitectureError(f"encoder layers are not numbered 0…{len(indices) - 1} "
                                       f"(found {sorted(indices)[:8]})")
    return len(indices)


def expected_shapes(model_class, config) -> dict[str, tuple]:
    """Every tensor of `model_class(config)` and its shape, from a skeleton on the meta device (no memory), so
    every tensor of a file can be asserted (nanoGPT-style) against what the class really holds."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}


def check_tensors(sd: dict, expected: dict[str, tuple], where: str, optional=()) -> None:
    """Every expected tensor is there (unless optional), has its shape, and holds finite floating-point values."""
    for key, shape in expected.items():
        if key not in sd:
            if key in optional:
                continue
            raise UnknownArchitectureError(f"{where}: missing tensor {key}: not a complete model of this kind")
        if tuple(sd[key].shape) != shape:
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(sd[key].shape)}, expected {shape}")
        if not sd[key].is_floating_point():
            raise CorruptFileError(f"{where}: {key} has dtype {sd[key].dtype}; expected floating-point weights")
        if not torch.isfinite(sd[key]).all():
            raise NonFiniteWeightsError(f"{where}: {key} contains NaN or Inf values")


def build_model(sd: dict[str, torch.Tensor], config: BertConfig, seed: int = 0, where: str = "the weights"
                ) -> tuple[BertForSequenceClassification, bool]:
    """Assert every shape, check the values, load. The head is optional. Returns (model, has_head)."""
    model_class = canonical_class(config)
    expected = expected_shapes(model_class, config)
    check_tensors(sd, expected, where, optional=HEAD_KEYS)
    torch.manual_seed(seed)
    model = model_class(config)
    model.load_state_dict({k: v.float() for k, v in sd.items() if k in expected}, strict=False)
    return model.eval(), "classifier.weight" in sd


def _build_source(sd: dict, base: dict, where: str, config_where: str, *, heads, num_labels, names, seed,
                  layers=None):
    """State dict (any family's names) → (canonical model, has_head, family, ignored keys)."""
    sd = adapters.strip_wrappers(sd)
    family = adapters.detect(sd, base.get("model_type"))
    if family is None:
        raise UnknownArchitectureError(f"{where}: unknown key layout (first keys: {', '.join(list(sd)[:3])}); "
                                       f"known families: {adapters.known()} (Hugging Face names; UER-py's own)")
    base = validate_config(adapters.config_in_bert_names(base, family), config_where)
    if layers is not None and base.get("num_hidden_layers") is None:
        base["num_hidden_layers"] = layers
    canonical, unmapped = adapters.to_canonical(sd, family, base)
    config = infer_config(canonical, base, heads=heads, num_labels=num_labels, names=names,
                          head_activation=getattr(family, "HEAD_ACTIVATION", "tanh"))
    check_config_matches(base, config, family, config_where)
    model, has_head = build_model(canonical, config, seed=seed, where=where)
    ignored = sorted(unmapped) + sorted(k for k in canonical if k.startswith(("ignored.", "unused.")))
    return model, has_head, family, ignored


# ------------------------------------------------------------------------------------------- tokenizers
def load_tokenizer(folder):
    """A tokenizer from a folder (tokenizer.json or vocab.txt); a tokenizer object is returned as it is."""
    if folder is None or not isinstance(folder, (str, os.PathLike)):
        return folder
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{folder}: no tokenizer files (tokenizer.json or vocab.txt)")
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
        return BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    except Exception as e:  # tokenizer libraries raise many types; report one line
        raise TokenizerError(f"{folder}: cannot load the tokenizer ({_first_line(e)[:160]})") from None


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    try:
        n = len(tokenizer)
    except TypeError:
        raise TokenizerError(f"expected a tokenizer, got a {type(tokenizer).__name__}") from None
    if n > vocab_size or n < vocab_size - max(8, math.ceil(0.01 * vocab_size)):
        raise TokenizerError(f"the tokenizer has {n} entries but the word embeddings have {vocab_size} rows")


# ------------------------------------------------------------------------------------------- entry points
def source_from_model(model, tokenizer=None, *, heads: int | None = None, num_labels: int | None = None,
                      labels: str | Path | None = None, seed: int = 0, layers: int | None = None) -> SourceModel:
    """A SourceModel from an in-memory transformers model (BertForSequenceClassification,
    RobertaForSequenceClassification, BertModel, …). Its state dict goes through the same name maps, config
    inference and shape checks as a file; the canonical copy shares no memory with `model`.
    `tokenizer`: a tokenizer object or folder (optional; its size is checked against the vocabulary)."""
    if not isinstance(model, nn.Module):
        raise UnknownArchitectureError(f"expected a transformers model or a checkpoint path, got "
                                       f"{type(model).__name__}")
    origin = f"{type(model).__name__}.config"
    cfg = getattr(model, "config", None)
    base = validate_config(cfg.to_dict() if hasattr(cfg, "to_dict") else {}, origin)
    sd = model.state_dict()
    if any(v.is_meta for v in sd.values()):
        raise CorruptFileError(f"{type(model).__name__}: its weights are not loaded (tensors on the meta device)")
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    names = (read_label_names(Path(labels)), str(labels)) if labels is not None else None
    canonical, has_head, family, ignored = _build_source(sd, base, type(model).__name__, origin, heads=heads,
                                                         num_labels=num_labels, names=names, seed=seed,
                                                         layers=layers)
    tok = load_tokenizer(tokenizer)
    if tok is not None:
        check_tokenizer(tok, canonical.config.vocab_size)
    return SourceModel(canonical, tok, family.FAMILY, has_head, f"<in-memory {type(model).__name__}>", ignored)


def load_source(source, *, heads: int | None = None, tokenizer=None, num_labels: int | None = None,
                labels: str | Path | None = None, require_tokenizer: bool = True, seed: int = 0,
                layers: int | None = None) -> SourceModel:
    """Load a source model (a checkpoint of any supported format, or an in-memory model: see source_from_model)
    into a canonical BertForSequenceClassification.

    Class names come from `labels` (a labels.json: a JSON list of names by id), else config.json, else a
    labels.json beside the checkpoint, else they stay LABEL_0…"""
    if isinstance(source, nn.Module):
        src = source_from_model(source, tokenizer, heads=heads, num_labels=num_labels, labels=labels, seed=seed,
                                layers=layers)
        if src.tokenizer is None and require_tokenizer:
            raise TokenizerError(f"{src.path}: pass its tokenizer (tokenizer=a tokenizer object or folder)")
        return src
    path = Path(source)
    base, origin, tok_dir, weights = {}, "config.json", path.parent, path
    if path.is_dir():
        origin, tok_dir, weights = str(path / "config.json"), path, _find_weights(path)
        if (path / "config.json").is_file():
            base = read_config(path / "config.json")
    names = label_names_for(labels, tok_dir, base)
    model, has_head, family, ignored = _build_source(read_state_dict(weights), base, str(weights), origin,
                                                     heads=heads, num_labels=num_labels, names=names, seed=seed,
                                                     layers=layers)
    if not has_head:
        log.warning("%s has no classification head: the encoder converts, but a head must come from fine-tuning "
                    "(the converted model's head is randomly initialised)", path)
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        tok = load_tokenizer(tok_dir)
    if tok is None and require_tokenizer:
        raise TokenizerError(f"no tokenizer found beside {path}; pass --tokenizer DIR (a folder with vocab.txt "
                             "or tokenizer.json)")
    if tok is not None:
        check_tokenizer(tok, model.config.vocab_size)
    return SourceModel(model, tok, family.FAMILY, has_head, str(path), ignored)


def is_converted(path) -> bool:
    """A folder whose config.json says MobileBERT (e.g. mbconvert's output)."""
    if not isinstance(path, (str, os.PathLike)):
        return getattr(getattr(path, "config", None), "model_type", None) == "mobilebert"
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "mobilebert"


def load_converted(folder: Path):
    """A converted MobileBERT folder, read without from_pretrained's loader: config.json is validated, the
    weights are read like a source model's (safetensors, or weights_only with size checks: never code), and every
    tensor's shape is compared with the model the config describes (built on the meta device) first."""
    from transformers import MobileBertConfig, MobileBertForSequenceClassification

    folder = Path(folder)
    cfg_file = folder / "config.json"
    base = read_config(cfg_file)
    weights = _find_weights(folder)
    sd = adapters.strip_wrappers(read_state_dict(weights))
    found = {m.group(1) for k in sd if (m := re.match(r"mobilebert\.encoder\.layer\.(\d{1,6})\.", k))}
    if base.get("num_hidden_layers", 24) != len(found):  # 24: MobileBertConfig's default
        raise ShapeMismatchError(f"{cfg_file} says num_hidden_layers {base.get('num_hidden_layers', 24)} but "
                                 f"{weights.name} holds {len(found)} layers")
    if base.get("num_feedforward_networks", 4) > 64:  # each is a module: bound them before building
        raise CorruptFileError(f"{cfg_file}: num_feedforward_networks {base['num_feedforward_networks']} (at most 64)")
    try:
        config = MobileBertConfig.from_dict(base)
        config._attn_implementation, config._name_or_path = "eager", str(folder)
        expected = expected_shapes(MobileBertForSequenceClassification, config)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise CorruptFileError(f"{cfg_file}: cannot build the model it describes ({_first_line(e)})") from None
    check_tensors(sd, expected, f"{weights} (with its {cfg_file.name})")
    model = MobileBertForSequenceClassification(config)
    model.load_state_dict({k: sd[k] for k in expected})
    return model.eval()


def load_classifier(source, *, tokenizer=None, heads: int | None = None):
    """(model, tokenizer) for any model a stage may be handed: a converted MobileBERT folder, a source model
    checkpoint, or an in-memory model (a MobileBERT is used as it is)."""
    if isinstance(source, nn.Module):
        if is_converted(source):
            return source.eval(), load_tokenizer(tokenizer)
        src = source_from_model(source, tokenizer, heads=heads)
        return src.model, src.tokenizer
    path = Path(source)
    if is_converted(path):
        if tokenizer is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
            return load_converted(path), None  # a weights-only conversion: the caller says if it needs one
        return load_converted(path), load_tokenizer(tokenizer if tokenizer is not None else path)
    src = load_source(path, heads=heads, tokenizer=tokenizer)
    return src.model, src.tokenizer


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
