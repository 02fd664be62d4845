"""dsom: reference implementation of DSoM (reinforced multimodal distillation for MKG reasoning).

Python API entry points (imported lazily so ``import dsom`` stays cheap)::

    from dsom import load_dataset, evaluate, predict, load_checkpoint
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "load_dataset": ("dsom.data.registry", "load"),
    "evaluate": ("dsom.evaluate", "evaluate"),
    "predict": ("dsom.predict", "predict"),
    "load_checkpoint": ("dsom.train.checkpoint", "load_checkpoint"),
    "ComplEx": ("dsom.models.complex", "ComplEx"),
    "KGDataset": ("dsom.data.graph", "KGDataset"),
    "ModalityTable": ("dsom.data.modality", "ModalityTable"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dsom' has no attribute {name!r}")
