"""A source checkpoint's config.json and labels.json: read, type-checked, and held against the weights.

Bad values are one-line typed errors (CorruptFileError for a malformed file, ShapeMismatchError for a file that
contradicts the weights or the classifier), never a traceback from deep inside transformers.
"""

from __future__ import annotations

from pathlib import Path

from .fileio import read_json
from .errors import CorruptFileError, ShapeMismatchError

INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "num_labels", "embedding_size",
              "intra_bottleneck_size", "num_feedforward_networks")
CHECKED_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings")


def read_config(path: Path) -> dict:
    """config.json, with the fields mbconvert reads checked for type (one-line errors, not tracebacks)."""
    return validate_config(read_json(path, CorruptFileError), str(path))


def validate_config(cfg, where: str) -> dict:
    """`cfg` is a JSON object whose sizes are positive integers, eps a positive number, the activation known,
    and id2label a map of class ids 0…n-1 to distinct names."""
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{where}: expected a JSON object, got a JSON {type(cfg).__name__}")
    for key in INT_FIELDS:
        if cfg.get(key) is not None and not _is_int(cfg[key], 1):
            raise CorruptFileError(f"{where}: {key} must be a positive integer, not {_short(cfg[key])}")
    if cfg.get("pad_token_id") is not None and not _is_int(cfg["pad_token_id"], 0):
        raise CorruptFileError(f"{where}: pad_token_id must be a token id, not {_short(cfg['pad_token_id'])}")
    eps = cfg.get("layer_norm_eps")
    if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
        raise CorruptFileError(f"{where}: layer_norm_eps must be a small positive number, not {_short(eps)}")
    if "hidden_act" in cfg:
        from transformers.activations import ACT2FN

        if not isinstance(cfg["hidden_act"], str) or cfg["hidden_act"] not in ACT2FN:
            raise CorruptFileError(f"{where}: unknown hidden_act {_short(cfg['hidden_act'])}")
    if cfg.get("model_type") is not None and not isinstance(cfg["model_type"], str):
        raise CorruptFileError(f"{where}: model_type must be a string, not {_short(cfg['model_type'])}")
    parse_id2label(cfg.get("id2label"), where)
    return cfg


def parse_id2label(raw, where: str) -> dict[int, str] | None:
    """config.json's id2label as {id: name}, ids 0…n-1 (JSON keys are strings)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise CorruptFileError(f"{where}: id2label must be an object mapping class ids to names")
    try:
        out = {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise CorruptFileError(f"{where}: id2label keys must be class ids 0…{len(raw) - 1}, not "
                               f"{_short(list(raw)[:4])}") from None
    if sorted(out) != list(range(len(out))):
        raise CorruptFileError(f"{where}: id2label keys must be the class ids 0…{len(out) - 1}")
    if not all(isinstance(v, str) for v in out.values()) or len(set(out.values())) != len(out):
        raise CorruptFileError(f"{where}: id2label names must be distinct strings")
    return dict(sorted(out.items()))


def read_label_names(path: Path) -> list[str]:
    """A labels.json (or the one in a folder): a JSON list of distinct class names, by class id."""
    path = Path(path)
    path = path / "labels.json" if path.is_dir() else path
    names = read_json(path, CorruptFileError)
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CorruptFileError(f"{path}: expected a JSON list of class names (strings), by class id")
    if len(set(names)) != len(names):
        raise CorruptFileError(f"{path}: class names must be distinct")
    return names


def label_names_for(labels, folder: Path, base: dict) -> tuple[list[str], str] | None:
    """(names, where from): `labels` if given; else a labels.json in `folder` when config.json names no classes.
    A labels.json that is there is always checked (an invalid one is an error, not silently skipped)."""
    if labels is not None:
        return read_label_names(Path(labels)), str(labels)
    beside = folder / "labels.json"
    if not beside.is_file():
        return None
    names = read_label_names(beside)
    id2label = parse_id2label(base.get("id2label"), "config.json")
    return (names, str(beside)) if id2label is None or generic(id2label) else None


def class_names(labels: int, id2label: dict | None, names: tuple[list[str], str] | None) -> dict | None:
    """{id: name} from labels.json (`names`) or config.json's id2label; None keeps LABEL_i. A list of names of
    the wrong length is an error, not a silent LABEL_i (generic LABEL_i names of another count are ignored)."""
    if names is not None:
        if len(names[0]) != labels:
            raise ShapeMismatchError(f"{names[1]} names {len(names[0])} classes but the classifier has {labels}")
        return dict(enumerate(names[0]))
    if id2label is None or (len(id2label) != labels and generic(id2label)):
        return None
    if len(id2label) != labels:
        raise ShapeMismatchError(f"config.json's id2label names {len(id2label)} classes but the classifier has "
                                 f"{labels}")
    return id2label


def generic(id2label: dict) -> bool:
    return all(v == f"LABEL_{k}" for k, v in id2label.items())


def check_config_matches(base: dict, config, family, origin: str) -> None:
    """config.json must describe the weights beside it (`config`: what the shapes say): a contradiction means
    one of them is another model's."""
    offset = getattr(family, "PADDING_OFFSET", 0)  # RoBERTa's position table has 2 extra rows
    for key in CHECKED_FIELDS:
        said = base.get(key)
        actual = getattr(config, key) + (offset if key == "max_position_embeddings" else 0)
        if said is not None and said != actual:
            raise ShapeMismatchError(f"{origin} says {key} {said} but the weights have {actual}")


def _is_int(value, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
