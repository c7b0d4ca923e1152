"""mbconvert: turn a trained BERT-style classifier into a Hugging Face MobileBERT without losing accuracy.

Stages, one module each:  load (mbconvert.load) → map (mbconvert.adapter) → recover (mbconvert.recover)
→ check (mbconvert.check) → export (mbconvert.export) → gate (mbconvert.gate).
"""

from .config import CheckConfig, ConvertConfig, ExportConfig, GateConfig, RecoveryConfig
from .errors import MbconvertError

__version__ = "0.1.0"

_LAZY = {
    "load_student": ("load", "load_student"),
    "load_classifier": ("load", "load_classifier"),
    "MobileBERTAdapter": ("adapter", "MobileBERTAdapter"),
    "convert": ("adapter", "convert"),
    "recover": ("recover", "recover"),
    "CompatibilityTestSuite": ("check", "CompatibilityTestSuite"),
    "export_model": ("export", "export_model"),
    "gate": ("gate", "gate"),
}


def __getattr__(name):  # keep `import mbconvert` fast: torch/transformers load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)


__all__ = ["ConvertConfig", "RecoveryConfig", "CheckConfig", "ExportConfig", "GateConfig", "MbconvertError",
           *_LAZY]
