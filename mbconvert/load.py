"""Stage 1 — load: read a student in any supported format into one canonical BERT classifier.

Accepted: a state dict (.pt/.bin, with or without bert./roberta./module. prefixes and the head), a
.safetensors file, a Hugging Face model folder (config.json + weights + tokenizer), UER-py native names.
Everything is renamed to Hugging Face BertForSequenceClassification's keys (see mbconvert.adapters), the
architecture is inferred from tensor shapes, every shape is asserted, and a BertForSequenceClassification
is built. Nothing is unpickled beyond weights_only=True.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from . import adapters
from .data import label_names_for
from .errors import (CorruptFileError, NonFiniteWeightsError, ShapeMismatchError, TokenizerError,
                     UnknownArchitectureError)
from .fileio import safe_torch_load

log = logging.getLogger("mbconvert")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclass
class SourceModel:
    """A loaded student: the canonical BERT classifier plus what was learned while loading it."""

    model: BertForSequenceClassification
    tokenizer: object | None
    family: str
    has_head: bool
    path: str
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def config(self) -> BertConfig:
        return self.model.config


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file; one-line errors for truncated/corrupt/unsafe files."""
    if not path.exists():
        raise CorruptFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError (a Rust type) and OSError
            raise CorruptFileError(f"{path}: truncated or corrupt safetensors file ({str(e).splitlines()[0][:120]})") from None
    obj = safe_torch_load(path)
    for wrapper in ("state_dict", "model_state_dict", "model"):  # common training-loop checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict()))")
    return obj


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CorruptFileError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def infer_config(sd: dict[str, torch.Tensor], base: dict | None = None, heads: int | None = None,
                 num_labels: int | None = None) -> BertConfig:
    """BertConfig from tensor shapes; `base` (a config.json) supplies what shapes cannot (heads, eps, labels)."""
    base = dict(base or {})
    try:
        vocab, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
        positions = sd["bert.embeddings.position_embeddings.weight"].shape[0]
        types = sd["bert.embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise UnknownArchitectureError(f"missing tensor {e.args[0]} after renaming: not a BERT-family encoder") from None
    layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise UnknownArchitectureError("no encoder layers found")
    n_heads = heads or base.get("num_attention_heads") or max(1, hidden // 64)
    if hidden % n_heads:
        raise ShapeMismatchError(f"hidden size {hidden} is not divisible by {n_heads} heads (pass --heads)")
    labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else (num_labels or base.get("num_labels") or 2)
    cfg = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=n_heads,
        intermediate_size=intermediate, max_position_embeddings=positions, type_vocab_size=types,
        hidden_act=base.get("hidden_act", "gelu"), layer_norm_eps=base.get("layer_norm_eps", 1e-12),
        pad_token_id=base.get("pad_token_id", 0) if base.get("model_type") != "roberta" else 1,
        num_labels=labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    id2label = base.get("id2label")
    if id2label and len(id2label) == labels:
        cfg["id2label"] = {int(k): v for k, v in id2label.items()}
        cfg["label2id"] = {v: int(k) for k, v in id2label.items()}
    config = BertConfig(**cfg)
    config._attn_implementation = "eager"  # recovery and check read attention maps
    return config


def expected_shapes(c: BertConfig) -> dict[str, tuple]:
    """Every canonical tensor and its shape (nanoGPT-style: assert all of them)."""
    H, I = c.hidden_size, c.intermediate_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (c.vocab_size, H),
        "bert.embeddings.position_embeddings.weight": (c.max_position_embeddings, H),
        "bert.embeddings.token_type_embeddings.weight": (c.type_vocab_size, H),
        "bert.embeddings.LayerNorm.weight": (H,), "bert.embeddings.LayerNorm.bias": (H,),
        "bert.pooler.dense.weight": (H, H), "bert.pooler.dense.bias": (H,),
        "classifier.weight": (c.num_labels, H), "classifier.bias": (c.num_labels,),
    }
    for i in range(c.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (H, H)
            shapes[p + f"attention.self.{name}.bias"] = (H,)
        shapes.update({
            p + "attention.output.dense.weight": (H, H), p + "attention.output.dense.bias": (H,),
            p + "attention.output.LayerNorm.weight": (H,), p + "attention.output.LayerNorm.bias": (H,),
            p + "intermediate.dense.weight": (I, H), p + "intermediate.dense.bias": (I,),
            p + "output.dense.weight": (H, I), p + "output.dense.bias": (H,),
            p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,),
        })
    return shapes


def build_model(sd: dict[str, torch.Tensor], config: BertConfig, seed: int = 0
                ) -> tuple[BertForSequenceClassification, bool]:
    """Assert every shape, check finiteness, load. Returns (model, has_head)."""
    shapes = expected_shapes(config)
    head_keys = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    for key, shape in shapes.items():
        if key not in sd:
            if key in head_keys:
                continue
            raise UnknownArchitectureError(f"missing tensor {key}: the key layout is not a complete BERT encoder")
        if tuple(sd[key].shape) != shape:
            raise ShapeMismatchError(f"{key} has shape {tuple(sd[key].shape)}, expected {shape}")
        if not torch.isfinite(sd[key]).all():
            raise NonFiniteWeightsError(f"{key} contains NaN or Inf values")
    has_head = "classifier.weight" in sd
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    wanted = {k: v.float() for k, v in sd.items() if k in shapes}
    missing, _ = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected_missing = [k for k in missing if k not in head_keys]
    assert not unexpected_missing, unexpected_missing
    return model.eval(), has_head


def load_tokenizer(folder: Path | str | None):
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{folder}: no tokenizer files (tokenizer.json or vocab.txt)")
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
        return BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    except Exception as e:  # tokenizer libraries raise many types; report one line
        raise TokenizerError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0][:160]})") from None


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    n = len(tokenizer)
    if n > vocab_size or n < vocab_size - max(8, math.ceil(0.01 * vocab_size)):
        raise TokenizerError(f"the tokenizer has {n} entries but the word embeddings have {vocab_size} rows")


def load_student(path: str | Path, *, heads: int | None = None, tokenizer: str | Path | None = None,
                 num_labels: int | None = None, labels: str | Path | None = None, require_tokenizer: bool = True,
                 seed: int = 0) -> SourceModel:
    """Load a student checkpoint of any supported format into a canonical BertForSequenceClassification.

    Class names come from config.json, else from `labels` or a labels.json beside the checkpoint (a JSON
    list of names by id), else they stay LABEL_0…"""
    path = Path(path)
    base = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                base = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{cfg_file}: not valid JSON ({e.msg})") from None
        weights = _find_weights(path)
        tok_dir = path
    else:
        weights = path
        tok_dir = path.parent
    sd = adapters.strip_wrappers(read_state_dict(weights))
    family = adapters.detect(sd, (base or {}).get("model_type"))
    if family is None:
        sample = ", ".join(list(sd)[:3])
        raise UnknownArchitectureError(f"{weights}: unknown key layout (first keys: {sample}); "
                                       "supported: Hugging Face BERT/RoBERTa names, UER-py names")
    canonical, unmapped = adapters.to_canonical(sd, family)
    names = label_names_for(labels) if labels else label_names_for(tok_dir)
    if labels and names is None:
        raise CorruptFileError(f"{labels}: expected a JSON list of class names")
    if names and not (base or {}).get("id2label"):
        base = {**(base or {}), "id2label": dict(enumerate(names))}
    config = infer_config(canonical, base, heads=heads, num_labels=num_labels)
    if labels and len(names) != config.num_labels:
        raise ShapeMismatchError(f"{labels} names {len(names)} classes but the classifier has {config.num_labels}")
    model, has_head = build_model(canonical, config, seed=seed)
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
        check_tokenizer(tok, config.vocab_size)
    ignored = sorted(k for k in unmapped) + sorted(k for k in canonical if k.startswith(("ignored.", "unused.")))
    return SourceModel(model, tok, family.FAMILY, has_head, str(path), ignored)


def is_converted(path: str | Path) -> bool:
    """A folder that AutoModelForSequenceClassification can load as-is (e.g. mbconvert's output)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "mobilebert"
    except json.JSONDecodeError:
        return False


def load_classifier(path: str | Path, *, tokenizer: str | Path | None = None, heads: int | None = None):
    """(model, tokenizer) for any model a stage may be handed: a converted MobileBERT folder or a student."""
    path = Path(path)
    if is_converted(path):
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation="eager")
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptFileError(f"{path}: cannot load the converted model ({str(e).splitlines()[0][:160]})") from None
        tok = load_tokenizer(tokenizer or path)
        return model.eval(), tok
    src = load_student(path, heads=heads, tokenizer=tokenizer)
    return src.model, src.tokenizer
