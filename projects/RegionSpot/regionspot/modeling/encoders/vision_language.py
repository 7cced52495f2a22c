"""The base of every vision-language encoder family (OpenAI CLIP, open_clip, yours): the registry
of families and the image squash they share.

A vision-language encoder is a frozen module with `preprocess(image)` ((3, H, W) RGB in [0, 255]
-> (3, S, S) normalised), `encode_image_tokens(images)` ((B, 3, S, S) -> (B, T, W) token map),
`encode_text(prompts)` (strings -> (N, D), not normalised), `text_fingerprint()` (keys the
text-embedding cache), `compile_targets(autocast)`, and the properties `device`, `width` (W),
`text_dim` (D), `logit_scale` and `input_size`.
"""
import torch
import torch.nn.functional as F
from detectron2.utils.registry import Registry

VISION_LANGUAGE_ENCODER_REGISTRY = Registry("VISION_LANGUAGE_ENCODER")
VISION_LANGUAGE_ENCODER_REGISTRY.__doc__ = """
Vision-language encoder families (frozen CLIP-like models), built by `build_clip_encoder(cfg)`.

A registered class names in `BACKEND` the MODEL.REGIONSPOT.CLIP.BACKEND value it builds, and is
built as `cls(cfg)`: a detectron2 `@configurable` constructor whose `from_config(cls, cfg)` builds
the model.
"""

CLIP_RESIZE_MODES = ("bilinear", "bicubic")


def check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in CLIP_RESIZE_MODES:
        raise ValueError(f"Unknown CLIP resize mode {resize_mode!r} (MODEL.REGIONSPOT.CLIP.RESIZE_MODE); "
                         f"choose one of {CLIP_RESIZE_MODES}.")


def squash_to_square(image: torch.Tensor, size: int, resize_mode: str, antialias: bool) -> torch.Tensor:
    """(3, H, W) image -> (1, 3, size, size) float: the whole image squashed to CLIP's square, as
    the original code feeds CLIP (for every backend; only the normalisation is the model's own)."""
    return F.interpolate(image[None].float(), (size, size), mode=resize_mode, align_corners=False,
                         antialias=antialias)
