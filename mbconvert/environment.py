"""The software and machine a result was produced with, as reports record it (check's report.json, export.json).

No heavy imports: a package's version comes from the loaded module when it is imported, else from its installed
distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

CORE_PACKAGES = ("torch", "transformers", "numpy")


def package_version(name: str) -> str | None:
    """`name`'s version: the imported module's __version__, else the installed distribution's; None if absent."""
    version = getattr(sys.modules.get(name), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def versions(*packages: str) -> dict:
    """mbconvert's version, torch, transformers, numpy and each of `packages` (None when not installed), then the
    Python version, the platform string and the CPU count."""
    from . import __version__

    found = {name: package_version(name) for name in dict.fromkeys(CORE_PACKAGES + packages)}
    return {"mbconvert": __version__, **found, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
