"""Training-side PyTorch Mask R-CNN."""

from model.mask_rcnn import MaskRCNN, build_model

__all__ = ["MaskRCNN", "build_model"]
