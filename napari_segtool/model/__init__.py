"""Networks (U-Net, residual U-Net), their registry, model files and the bundled models."""

from napari_segtool.model.bundled import list_models, load_model
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.model.registry import REGISTRY, build_network
from napari_segtool.model.resunet import ResUNet
from napari_segtool.model.unet import UNet

__all__ = [
    "REGISTRY",
    "ResUNet",
    "SegmentationModel",
    "UNet",
    "build_network",
    "list_models",
    "load_model",
]
