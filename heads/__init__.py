"""Task heads (SSDLite detection, LR-ASPP segmentation) on mbbackbones backbones."""
