"""mbconvert: turn a trained BERT-style classifier into a Hugging Face MobileBERT without losing accuracy.

Stages, one module each, taking and returning objects:  load (mbconvert.load) → map (mbconvert.mapping)
→ recover (mbconvert.recovery) → check (mbconvert.check) → export (mbconvert.export) → gate (mbconvert.gating).
The path-level pipeline (files in, folders out: what the CLI runs) is mbconvert.pipeline.
"""

from .config import CheckConfig, ConvertConfig, ExportConfig, GateConfig, RecoveryConfig, RunOptions
from .errors import MbconvertError

__version__ = "0.1.0"

# name → module; no public name is also a submodule's name (importing the submodule would shadow it)
_LAZY = {
    "load_source": "load",
    "load_classifier": "load",
    "source_from_model": "load",
    "MobileBERTAdapter": "mapping",
    "recover": "recovery",
    "CompatibilityTestSuite": "check",
    "export_model": "export",
    "gate": "gating",
    "convert_checkpoint": "pipeline",
    "recover_checkpoint": "pipeline",
    "check_checkpoint": "pipeline",
    "export_checkpoint": "pipeline",
    "prune_checkpoint": "pipeline",
}


def __getattr__(name):  # keep `import mbconvert` fast: torch/transformers load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["ConvertConfig", "RecoveryConfig", "RunOptions", "CheckConfig", "ExportConfig", "GateConfig",
           "MbconvertError", "__version__", *_LAZY]
