"""dsom: reference implementation of DSoM (reinforced multimodal distillation for MKG reasoning)."""

__version__ = "0.1.0"
