"""RegionSpot: recognize any region with frozen SAM and CLIP (detectron2 extension).

Importing the package registers the meta-architecture and RegionSpot's datasets.
"""
from . import warnings_filter as _warnings_filter  # noqa: F401  (first: filters import-time warnings)
from . import datasets as _datasets  # noqa: F401  (only registration)
from .config import add_regionspot_config
from .meta_arch import RegionSpot

__all__ = ["add_regionspot_config", "RegionSpot"]
