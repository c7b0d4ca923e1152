"""Resumable recovery state: one file in the output folder, written atomically, tied to its inputs.

The state holds the model, optimiser, RNG and progress. Its fingerprint covers the recipe (`RecoveryConfig`) and the
content of every input (the source's weights, the MobileBERT's starting weights, the training and dev data), so a
`--resume` with other data, another source model or other options is refused instead of continuing silently.
"""

from __future__ import annotations

import json
from pathlib import Path


from .cache import content_key
from .errors import ConfigError
from .fileio import atomic_torch_save
from .safeload import safe_torch_load

STATE_FILE = "recovery_state.pt"


def data_key(data) -> str | None:
    if data is None:
        return None
    parts = [data.input_ids, data.attention_mask, data.token_type_ids]
    return content_key(*parts, *([data.labels] if data.labels is not None else []))


def fingerprint(recipe: dict, teacher_key: str, start_key: str, train_key: str | None, eval_key: str | None) -> str:
    """What a run's result is a function of: the recipe and the content keys of its inputs (mbconvert.cache)."""
    return json.dumps({"recipe": recipe, "teacher": teacher_key, "start": start_key, "train": train_key,
                       "eval": eval_key}, sort_keys=True)


def same_run(a: str | None, b: str | None, ignore: tuple[str, ...] = ()) -> bool:
    """Whether two fingerprints agree on everything but `ignore`."""
    try:
        da, db = json.loads(a), json.loads(b)
    except (TypeError, json.JSONDecodeError):
        return False
    return {k: v for k, v in da.items() if k not in ignore} == {k: v for k, v in db.items() if k not in ignore}


def save_state(out_dir: Path, state: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, out_dir / STATE_FILE)


def load_state(out_dir: Path | None, expected_fingerprint: str) -> dict | None:
    """The saved state, None when there is none; ConfigError when it belongs to another run."""
    path = out_dir / STATE_FILE if out_dir is not None else None
    if path is None or not path.is_file():
        return None
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        raise ConfigError(f"{path} was written by a recovery with other options, data or models; rerun without "
                          "--resume to start over")
    return state


def remove_state(out_dir: Path | None) -> None:
    if out_dir is not None:
        (out_dir / STATE_FILE).unlink(missing_ok=True)


__all__ = ["STATE_FILE", "fingerprint", "save_state", "load_state", "remove_state", "data_key", "same_run"]
