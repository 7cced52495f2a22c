"""Frozen CLIP: the image token map RegionSpot attends to, and the text encoder.

The token map is the output of the vision tower's last transformer block (class token included,
before ``ln_post`` and the projection). We run the tower's own submodules, so the `clip` package
is used as published; only the positional embedding is interpolated when the input size differs
from the checkpoint's.
"""
import math
import os
import zipfile
from typing import Dict, Tuple

import clip
import torch
import torch.nn.functional as F
from clip.model import CLIP
from clip.model import build_model as build_clip_from_state_dict
from detectron2.config import configurable
from torch import nn

from ...utils.safe_load import UnsafeFileError, check_torchscript, torch_load
from ...utils.weights import download, open_weights, resolve_weights
from ..text_embeddings import clip_fingerprint
from .seeding import RANDOM_INIT_SEED, seeded_random_init
from .vision_language import VISION_LANGUAGE_ENCODER_REGISTRY, check_resize_mode, squash_to_square

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Architectures for *random* initialisation only (benchmarks); real weights carry their own
# shapes. Values are those of OpenAI's released models:
# (embed_dim, image_resolution, vision_layers, vision_width, patch, text_width, text_heads, text_layers)
_RANDOM_ARCHS: Dict[str, Tuple[int, ...]] = {
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
    # Small enough for CPU unit tests; widths are multiples of 64 because CLIP derives its
    # head counts as width // 64.
    "tiny": (32, 64, 1, 64, 16, 64, 1, 1),
}


def available_clip_models() -> Tuple[str, ...]:
    return tuple(sorted(set(clip.available_models()) | set(_RANDOM_ARCHS)))


def _build_random_clip(name: str, seed: int = RANDOM_INIT_SEED) -> CLIP:
    """Random weights from a fixed seed (global RNG untouched): every build gets the same CLIP."""
    embed, res, vl, vw, patch, tw, th, tl = _RANDOM_ARCHS[name]
    with seeded_random_init(seed):
        return CLIP(embed, res, vl, vw, patch, 77, 49408, tw, th, tl)


def build_clip(name: str, checkpoint: str = "", download_root: str = "", seed: int = RANDOM_INIT_SEED) -> CLIP:
    """Build frozen CLIP in fp32 on the CPU.

    Args:
        name: a `clip` package model name, or "tiny".
        checkpoint: "" = download `name` through the clip package; "random" = random init;
            otherwise a local path or http(s) URL of an OpenAI-format CLIP file.
        download_root: cache folder for downloads by name ("" = the clip package default).
        seed: seed of a random initialisation.
    """
    if name not in available_clip_models():
        raise ValueError(
            f"Unknown CLIP model {name!r} (MODEL.REGIONSPOT.CLIP.NAME); "
            f"choose one of {available_clip_models()}, or set MODEL.REGIONSPOT.CLIP.BACKEND open_clip for "
            "open_clip's models (ViT-L-14-quickgelu, ViT-SO400M-14-SigLIP-384, ...)."
        )
    if checkpoint == "random" or (checkpoint == "" and name == "tiny"):
        if name not in _RANDOM_ARCHS:
            raise ValueError(f"No architecture is known for a random {name!r} CLIP.")
        return _build_random_clip(name, seed).float().eval()
    if checkpoint == "":
        model, _ = clip.load(download_clip(name, download_root), device="cpu", jit=False)
        return model.float().eval()
    local = resolve_weights(checkpoint, f"CLIP {name} checkpoint", "MODEL.REGIONSPOT.CLIP.CHECKPOINT")
    # A corrupt file can make the loaders raise almost anything (IndexError: pop from empty list,
    # UnicodeDecodeError, KeyError, ...), and so can a state dict of another model: all are
    # reported with the file and the key, the original chained as the cause.
    try:
        # OpenAI's files are TorchScript archives; others are plain state dicts. (clip.load
        # reads both, but reuses one file handle for the second try and fails on plain files.)
        source = open_weights(local)
        if _is_torchscript(source):  # code as well as weights: only OpenAI's released files (by SHA256)
            check_torchscript(source, local, "MODEL.REGIONSPOT.CLIP.CHECKPOINT", official_clip_sha256())
            state = torch.jit.load(source, map_location="cpu").state_dict()
        else:
            state = torch_load(source, local, "MODEL.REGIONSPOT.CLIP.CHECKPOINT")
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
        state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        model = build_clip_from_state_dict(dict(state)).float()
        # build_model rounds to fp16 as OpenAI ships it; load again so fp32 files stay exact.
        model.load_state_dict(state)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"The CLIP checkpoint {local} (MODEL.REGIONSPOT.CLIP.CHECKPOINT) is corrupt, truncated or not an "
            f"OpenAI-format CLIP file ({type(e).__name__}: {e})."
        ) from e
    return model.eval()


def official_clip_sha256() -> set:
    """SHA256 checksums of OpenAI's released CLIP files (each is part of its download URL)."""
    return {url.split("/")[-2] for url in clip.clip._MODELS.values()}


def download_clip(name: str, download_root: str = "") -> str:
    """The local file of OpenAI's CLIP `name`, downloaded once as `clip.load` would (same URL, same
    file in `download_root`, default ~/.cache/clip, same SHA256 check), but with a timeout and an
    error that says how to do without the download."""
    url = clip.clip._MODELS[name]  # the clip package's own table of released files
    root = os.path.expanduser(download_root or "~/.cache/clip")
    target = os.path.join(root, os.path.basename(url))
    return download(url, "MODEL.REGIONSPOT.CLIP.CHECKPOINT", f"CLIP {name} weights", target=target,
                    sha256=url.split("/")[-2],  # clip.load then jit-loads only this checked file
                    hint=f" (OpenAI's {name} file, the model MODEL.REGIONSPOT.CLIP.NAME names), or put it at {target}")
def _is_torchscript(source) -> bool:
    """Whether a weights file (path or bytes buffer) is a TorchScript archive (OpenAI's releases)
    rather than a plain torch.save state dict: only TorchScript archives hold compiled code."""
    try:
        with zipfile.ZipFile(source) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False  # legacy (pre-zip) torch.save files, or a corrupt file: torch.load reports it
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


@VISION_LANGUAGE_ENCODER_REGISTRY.register()
class ClipImageTextEncoder(nn.Module):
    """Wraps a frozen CLIP: images -> token maps (B, 1 + g*g, W), prompts -> text embeddings.

    The `clip` package family (CLIP.BACKEND clip): `ClipImageTextEncoder(cfg)` builds the CLIP
    cfg.MODEL.REGIONSPOT.CLIP describes."""

    BACKEND = "clip"

    @configurable
    def __init__(self, clip_model: CLIP, input_size: int = 224, resize_mode: str = "bilinear",
                 antialias: bool = False):
        """
        Args:
            clip_model: a built CLIP (frozen by the caller).
            input_size: side of the square image CLIP sees.
            resize_mode, antialias: how the whole image is squashed to that square. The original
                code calls torchvision's tensor `resize` with its defaults: bilinear, antialiased
                since torchvision 0.17 and not before (the released heads date from 2023).
        """
        super().__init__()
        check_resize_mode(resize_mode)
        self.clip_model = clip_model
        self.input_size = int(input_size)
        self.resize_mode = resize_mode
        self.antialias = bool(antialias)
        visual = clip_model.visual
        patch = visual.conv1.kernel_size[0]
        if self.input_size % patch:
            raise ValueError(f"CLIP input size {self.input_size} (MODEL.REGIONSPOT.CLIP.INPUT_SIZE) is not a "
                             f"multiple of its patch size {patch}.")
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.REGIONSPOT
        return {"clip_model": build_clip(c.CLIP.NAME, c.CLIP.CHECKPOINT, c.CLIP.DOWNLOAD_ROOT, c.RANDOM_INIT_SEED),
                "input_size": c.CLIP.INPUT_SIZE, "resize_mode": c.CLIP.RESIZE_MODE, "antialias": c.CLIP.ANTIALIAS}

    def compile_targets(self, autocast: bool = False) -> Tuple[nn.Module, ...]:
        """The module `compile_frozen` compiles: the image transformer."""
        return (self.clip_model.visual.transformer,)

    def text_fingerprint(self) -> str:
        """A digest of the text tower (see `clip_fingerprint`): keys the text-embedding cache."""
        return clip_fingerprint(self.clip_model)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def width(self) -> int:
        return self.clip_model.visual.conv1.out_channels

    @property
    def text_dim(self) -> int:
        return self.clip_model.text_projection.shape[1]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip_model.logit_scale.exp()

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB in [0, 255] -> (3, S, S) normalised: the whole image squashed to a square."""
        x = squash_to_square(image, self.input_size, self.resize_mode, self.antialias)
        return ((x - self.pixel_mean) / self.pixel_std)[0]

    def _positional_embedding(self, grid: int) -> torch.Tensor:
        pos = self.clip_model.visual.positional_embedding
        old = int(round(math.sqrt(pos.shape[0] - 1)))
        if old == grid:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), (grid, grid), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos])

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 1 + (S/p)^2, W) token map."""
        visual = self.clip_model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        x = visual.ln_pre(x)
        x = visual.transformer(x.permute(1, 0, 2))  # the clip package's blocks are sequence-first
        return x.permute(1, 0, 2)

    def encode_text(self, prompts) -> torch.Tensor:
        """A list of strings -> (N, D) text embeddings, as CLIP projects them (not normalised)."""
        tokens = clip.tokenize(list(prompts), truncate=True).to(self.pixel_mean.device)
        return self.clip_model.encode_text(tokens).float()
