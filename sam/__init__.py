"""Segment Anything, our implementation: loads Meta's official checkpoints unchanged.

Existing code works by changing one import::

    from sam import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator
    from sam import build_sam, build_sam_vit_h, build_sam_vit_l, build_sam_vit_b
"""

from .amg import PRESETS, SamAutomaticMaskGenerator
from .checkpoint import CheckpointError
from .config import model_config, model_names
from .model import Sam, build_sam_from_config
from .predictor import SamPredictor
from .registry import (
    build_sam,
    build_sam_tiny,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    sam_model_registry,
)
from .transforms import ResizeLongestSide

__all__ = [
    "CheckpointError",
    "PRESETS",
    "SamAutomaticMaskGenerator",
    "ResizeLongestSide",
    "Sam",
    "SamPredictor",
    "build_sam",
    "build_sam_from_config",
    "build_sam_tiny",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "model_config",
    "model_names",
    "sam_model_registry",
]
__version__ = "0.1.0"
