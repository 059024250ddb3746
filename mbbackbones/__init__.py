"""MobileNet V1/V2/V3/V4 backbones with C1-C5 feature taps, registered into timm on import."""
from importlib.metadata import version

from .architectures import ARCHS, Row, V4Row, resolve
from .checkpoint import CheckpointError, convert, detect_format
from .model import MobileNet
from .registry import ENTRIES, MODELS, create_model, list_models

__all__ = ["ARCHS", "ENTRIES", "MODELS", "CheckpointError", "MobileNet", "Row", "V4Row", "convert", "create_model",
           "detect_format", "list_models", "resolve"]
__version__ = version("mbbackbones")
