"""RegionSpot without torch at serving time: the onnxruntime predictor of an exported folder.

The serving code is the top-level package `regionspot_deploy` (it must import without torch, and
`import regionspot` imports detectron2); this module re-exports it for users of the full package.
Export a model with `regionspot.onnx_export.export_folder` or tools/export_onnx.py.
"""
from regionspot_deploy import FolderError, OnnxRegionSpotPredictor, RegionResults, load_manifest

__all__ = ["OnnxRegionSpotPredictor", "RegionResults", "FolderError", "load_manifest"]
