"""Serve an exported RegionSpot folder (`tools/export_onnx.py`) with onnxruntime: numpy, Pillow and
onnxruntime only, no torch or detectron2 (ftfy and regex to embed new class names)."""
from .manifest import FolderError, load_manifest
from .predictor import OnnxRegionSpotPredictor, RegionResults

__all__ = ["OnnxRegionSpotPredictor", "RegionResults", "FolderError", "load_manifest"]
