"""RegionSpot: recognize any region with frozen SAM and CLIP (detectron2 extension).

Importing the package registers the meta-architecture, the ROI heads, the prompt sources and
RegionSpot's datasets.
"""
from . import warnings_filter as _warnings_filter  # noqa: F401  (first: filters import-time warnings)
from . import datasets as _datasets  # noqa: F401  (only registration)
from . import roi_heads as _roi_heads  # noqa: F401  (only registration)
from .config import add_regionspot_config
from .meta_arch import RegionSpot
from .predictor import RegionResults, RegionSpotPredictor
from .prompt_sources import PROMPT_SOURCE_REGISTRY, PromptSource
from .region_pipeline import RegionPipeline
from .roi_heads import RegionSpotROIHeads
from .vocabulary import Vocabulary

__all__ = ["add_regionspot_config", "RegionSpot", "RegionSpotPredictor", "RegionResults", "RegionPipeline",
           "RegionSpotROIHeads", "PromptSource", "PROMPT_SOURCE_REGISTRY", "Vocabulary"]
