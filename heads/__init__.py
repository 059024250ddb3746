"""Task heads on mbbackbones: SSDLite detection and LR-ASPP segmentation, built by name."""
from .registry import ENTRIES, MODELS, create_backbone, create_model, list_models

__all__ = ["ENTRIES", "MODELS", "create_backbone", "create_model", "list_models"]
