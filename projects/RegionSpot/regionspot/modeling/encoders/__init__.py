"""The frozen encoders: region encoders (SAM families) and vision-language encoders (CLIP
backends), each family in its own module, registered in the registries of the base modules
(`region_encoder.py`, `vision_language.py`) and built by `build.py`."""
# Only registration: importing each built-in family registers it. None of them imports an optional
# package (sam2, open_clip) before that family is built.
from . import sam_encoder as _sam_encoder  # noqa: F401
from . import sam2_encoder as _sam2_encoder  # noqa: F401
from . import clip_encoder as _clip_encoder  # noqa: F401
from . import open_clip_encoder as _open_clip_encoder  # noqa: F401
from .build import (  # noqa: F401
    build_clip_encoder,
    build_sam_encoder,
    region_encoder_types,
    sam_type_random_by_default,
    vision_language_backends,
)
from .region_encoder import REGION_ENCODER_REGISTRY, RegionEncoderBase  # noqa: F401
from .vision_language import VISION_LANGUAGE_ENCODER_REGISTRY  # noqa: F401
