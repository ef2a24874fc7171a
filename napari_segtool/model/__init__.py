"""U-Net, model files and the bundled models."""

from napari_segtool.model.bundled import list_models, load_model
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.model.unet import UNet

__all__ = ["SegmentationModel", "UNet", "list_models", "load_model"]
