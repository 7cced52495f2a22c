"""Build the frozen encoders a config names, from the registered families.

`build_sam_encoder(cfg)` finds the region encoder family that claims MODEL.REGIONSPOT.SAM.TYPE
(in its `SAM_TYPES`) and `build_clip_encoder(cfg)` the vision-language family whose `BACKEND` is
MODEL.REGIONSPOT.CLIP.BACKEND; each family builds itself from the config. Neither function knows
any family: importing this package registers the built-in ones (see `__init__.py`), and a
family of your own registers itself when its module is imported.
"""
from typing import List, Tuple, Type

from torch import nn

from ...config import check_regionspot_config
from .region_encoder import REGION_ENCODER_REGISTRY, RegionEncoderBase
from .vision_language import VISION_LANGUAGE_ENCODER_REGISTRY

SAM_TYPE_KEY = "MODEL.REGIONSPOT.SAM.TYPE"
CLIP_BACKEND_KEY = "MODEL.REGIONSPOT.CLIP.BACKEND"


def region_encoder_types() -> Tuple[str, ...]:
    """Every SAM.TYPE a registered region encoder family builds, in registration order."""
    return tuple(t for _, family in REGION_ENCODER_REGISTRY for t in family.SAM_TYPES)


def _the_claimant(claims: List[Tuple[str, type]], key: str, value: str, choices: Tuple[str, ...],
                  kind: str) -> type:
    """The one family in `claims` (registry name, class) for config `key` = `value`; ValueError
    naming the key and every registered choice when none, or the claimants when several."""
    if not claims:
        raise ValueError(f"Unknown {key} {value!r}; choose one of {choices}.")
    if len(claims) > 1:
        raise ValueError(f"{key} {value!r} is claimed by several registered {kind}: "
                         f"{', '.join(name for name, _ in claims)}.")
    return claims[0][1]


def region_encoder_family(sam_type: str) -> Type[RegionEncoderBase]:
    """The registered family that builds `sam_type`; ValueError naming the key and every type
    when none does, or when two families claim it."""
    claims = [(name, family) for name, family in REGION_ENCODER_REGISTRY if sam_type in family.SAM_TYPES]
    return _the_claimant(claims, SAM_TYPE_KEY, sam_type, region_encoder_types(), "region encoders")


def sam_type_random_by_default(sam_type: str) -> bool:
    """Whether SAM.CHECKPOINT "" means random weights for `sam_type` (no official file: the tests'
    tiny types). False for a type no family claims."""
    return any(sam_type in family.RANDOM_BY_DEFAULT_TYPES for _, family in REGION_ENCODER_REGISTRY)


def vision_language_backends() -> Tuple[str, ...]:
    """Every CLIP.BACKEND a registered vision-language family builds, in registration order."""
    return tuple(family.BACKEND for _, family in VISION_LANGUAGE_ENCODER_REGISTRY)


def vision_language_family(backend: str) -> Type[nn.Module]:
    """The registered family of CLIP.BACKEND `backend`; ValueError naming the key and every backend
    when none (or several) is."""
    claims = [(name, family) for name, family in VISION_LANGUAGE_ENCODER_REGISTRY if family.BACKEND == backend]
    return _the_claimant(claims, CLIP_BACKEND_KEY, backend, vision_language_backends(), "vision-language encoders")


def check_encoder_config(cfg) -> None:
    """Check SAM.TYPE and CLIP.BACKEND name registered families, before anything is built."""
    region_encoder_family(cfg.MODEL.REGIONSPOT.SAM.TYPE)
    vision_language_family(cfg.MODEL.REGIONSPOT.CLIP.BACKEND)


def build_sam_encoder(cfg) -> RegionEncoderBase:
    """The frozen region encoder described by cfg.MODEL.REGIONSPOT.SAM (on the CPU, in eval mode),
    built by the family that claims SAM.TYPE (`SamRegionEncoder`, `Sam2RegionEncoder`, or yours)."""
    check_regionspot_config(cfg)
    return region_encoder_family(cfg.MODEL.REGIONSPOT.SAM.TYPE)(cfg).eval()


def build_clip_encoder(cfg) -> nn.Module:
    """The frozen vision-language encoder described by cfg.MODEL.REGIONSPOT.CLIP (on the CPU, in eval
    mode), built by the family of CLIP.BACKEND (`ClipImageTextEncoder`, `OpenClipImageTextEncoder`,
    or yours)."""
    check_regionspot_config(cfg)
    return vision_language_family(cfg.MODEL.REGIONSPOT.CLIP.BACKEND)(cfg).eval()
