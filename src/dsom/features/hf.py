"""Loading ``transformers`` models for the feature encoders, with the project's error messages."""

from __future__ import annotations

from typing import Any

from dsom.errors import DsomError


def load_pretrained(model: str, kind: str, processor_class: str, hint: str) -> tuple[Any, Any]:
    """``(processor, model in eval mode)`` for a model folder or hub id; clear one-line errors otherwise.

    ``processor_class`` names a ``transformers`` auto class (``AutoTokenizer``, ``AutoImageProcessor``).
    """
    try:
        import transformers
    except ImportError:
        raise DsomError(f"{kind} features need the [features] extra: pip install 'dsom[features]'") from None
    try:
        processor = getattr(transformers, processor_class).from_pretrained(model)
        net = transformers.AutoModel.from_pretrained(model)
    except OSError as exc:
        raise DsomError(f"cannot load {kind} model '{model}': {str(exc).splitlines()[0]} ({hint})") from None
    return processor, net.eval()
