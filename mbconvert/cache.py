"""The one on-disk cache: tokenised data and the source model's logits, keyed by content hashes.

It lives outside every output folder (`$MBCONVERT_CACHE`, else `$XDG_CACHE_HOME/mbconvert`, else
`~/.cache/mbconvert`, or `RunOptions.cache_dir`): a model folder pushed to a hub must not carry the training texts,
and tokenised ids with labels decode back to them. Entries are safetensors files written atomically; an unreadable
entry is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("mbconvert")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MBCONVERT_CACHE"):
        return Path(os.environ["MBCONVERT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mbconvert"


def content_key(*parts) -> str:
    """A short hash of tensors (their bytes, dtype and shape) and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        else:
            h.update(json.dumps(part, ensure_ascii=False, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def model_key(model: torch.nn.Module) -> str:
    """The content hash of a model's weights (names and values)."""
    sd = model.state_dict()
    return content_key(list(sd), *sd.values())


def cached(cache_dir, kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`compute()` (a dict of tensors) once per key, kept under cache_dir/kind-key.safetensors."""
    from safetensors.torch import load_file, save

    from .fileio import atomic_write_bytes

    path = cache_root(cache_dir) / f"{kind}-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type; a bad entry is recomputed
            log.warning("ignoring an unreadable cache entry %s (%s)", path, str(e).splitlines()[0][:120])
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in value.items()}))
    except OSError as e:  # a cache that cannot be written costs time, not correctness
        log.warning("cannot write the cache entry %s (%s)", path, e.strerror or e)
    return value
