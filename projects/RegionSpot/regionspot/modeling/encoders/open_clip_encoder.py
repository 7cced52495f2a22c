"""Frozen open_clip models (DFN, MetaCLIP, EVA, SigLIP, ...) as RegionSpot's vision-language
backbone (MODEL.REGIONSPOT.CLIP.BACKEND open_clip), with the methods of `ClipImageTextEncoder`.

- Token map: the output of the vision tower's last transformer block, prefix (class, register)
  tokens first where the tower has them (SigLIP has none), before the final norm and the
  pooling / projection: what the paper attends to with OpenAI's CLIP. It is read with the
  tower's own `forward_intermediates` (open_clip's `VisionTransformer`, or a timm ViT / EVA trunk
  behind open_clip's `TimmModel`); other towers (ResNets, ConvNeXts) have no such map and are
  refused.
- Input size: the model is built at MODEL.REGIONSPOT.CLIP.INPUT_SIZE through open_clip's own
  `force_image_size`. open_clip then resamples the checkpoint's positional embeddings
  (`resize_pos_embed`, bicubic and antialiased; for timm trunks timm's `set_input_size`), so a
  model runs at any multiple of its patch size (and at its own size, which need not be one). (The clip backend interpolates bicubically without
  antialiasing: upsampled embeddings differ slightly between the two.)
- Text: open_clip's tokenizer for the model (`get_tokenizer`; SigLIP's and other HF tokenizers
  are fetched from the Hugging Face hub on first use), created when text is first encoded.
- Weights: CLIP.CHECKPOINT (a file, URL or regionspot://), else the CLIP.PRETRAINED tag through
  open_clip's own download, else random. A weights file holds the model as released, at its
  native image size (timm trunks load it before they are resized). The image normalisation is the model's own (open_clip's
  preprocess config: SigLIP's 0.5 / 0.5, OpenAI's statistics for most others); the resize is
  RegionSpot's squash (CLIP.RESIZE_MODE / ANTIALIAS), not open_clip's.

open_clip is an optional package (extra `regionspot[open_clip]`): it is imported on demand.
"""
import contextlib
import difflib
import hashlib
import inspect
import logging
import os
import pickle
import tempfile
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from ...utils.extras import require_extra
from ...utils.safe_load import UnsafeFileError, torch_load
from ...utils.weights import open_weights, resolve_weights
from .seeding import RANDOM_INIT_SEED, seeded_random_init
from .vision_language import VISION_LANGUAGE_ENCODER_REGISTRY, check_resize_mode, squash_to_square

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "MODEL.REGIONSPOT.CLIP.CHECKPOINT"
# Tiny random models for CPU tests, built from open_clip's own classes: "tiny" is an open_clip
# VisionTransformer CLIP (native size 64), "tiny-timm" a SigLIP-like model (MAP pooling, separate
# text tower) on timm's `test_vit3` trunk (native size 160, timm's for it; one register token).
# Their configs (open_clip_configs/*.json) are registered with open_clip's `add_model_config`, so
# they are built, loaded and tokenized as every other open_clip model.
TINY_MODELS = {"tiny": "regionspot-tiny", "tiny-timm": "regionspot-tiny-timm"}
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_clip_configs")


def import_open_clip() -> ModuleType:
    """The open_clip package with RegionSpot's tiny models registered, or MissingExtraError."""
    oc = require_extra("open_clip", "open_clip", "MODEL.REGIONSPOT.CLIP.BACKEND open_clip")
    if not set(TINY_MODELS.values()) <= set(oc.list_models()):
        oc.add_model_config(_CONFIG_DIR)
    return oc


def available_open_clip_models() -> Tuple[str, ...]:
    """The names MODEL.REGIONSPOT.CLIP.NAME takes with BACKEND open_clip."""
    oc = import_open_clip()
    return tuple(TINY_MODELS) + tuple(n for n in oc.list_models() if n not in TINY_MODELS.values())


def open_clip_architecture(name: str) -> str:
    """open_clip's name of the model CLIP.NAME names (the tiny ones are registered under their own)."""
    oc = import_open_clip()
    arch = TINY_MODELS.get(name, name)
    if arch not in oc.list_models():
        close = difflib.get_close_matches(name, available_open_clip_models(), n=5, cutoff=0.5)
        examples = close or ["ViT-B-16", "ViT-L-14-quickgelu", "ViT-SO400M-14-SigLIP-384", "EVA02-L-14", "tiny"]
        raise ValueError(f"Unknown open_clip model {name!r} (MODEL.REGIONSPOT.CLIP.NAME); "
                         f"{'did you mean' if close else 'for example'} {', '.join(examples)}? "
                         "open_clip.list_models() has them all.")
    return arch


def pretrained_preprocess_cfg(arch: str, tag: str = "") -> Dict[str, tuple]:
    """The image mean / std the open_clip model `arch` was trained with: its pretrained `tag`'s,
    or, without a tag, those all of its tags share. {} when unknown (open_clip then uses OpenAI's).
    Needed because open_clip knows them only from a tag, not from a weights file."""
    oc = import_open_clip()
    tags = [tag] if tag else oc.list_pretrained_tags_by_model(arch)
    stats = {(tuple(c["mean"]), tuple(c["std"])) for c in (oc.get_pretrained_cfg(arch, t) for t in tags)
             if c.get("mean") and c.get("std")}
    if len(stats) != 1:
        if len(stats) > 1:
            logger.warning(f"The pretrained tags of open_clip {arch} normalise images differently; set "
                           "MODEL.REGIONSPOT.CLIP.PRETRAINED to the tag of the CLIP.CHECKPOINT file to use "
                           "its mean and std (using open_clip's default, OpenAI's, now).")
        return {}
    ((mean, std),) = stats
    return {"mean": mean, "std": std}


@contextlib.contextmanager
def _plain_weights_file(local: str) -> Iterator[str]:
    """A path open_clip can read for `local`: itself, or, when gzip-compressed, its decompressed
    copy in a temporary folder (open_clip reads weights by path and does not decompress)."""
    source = open_weights(local)
    if isinstance(source, str):
        yield source
        return
    name = os.path.basename(local)
    name = name[:-3] if name.endswith(".gz") else name + ".pth"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(source.getbuffer())
        yield path


def _create(oc: ModuleType, arch: str, seed: int, **kwargs) -> nn.Module:
    """open_clip.create_model in fp32 on the CPU, random parts from `seed` (global RNG untouched)."""
    with seeded_random_init(seed):
        # pretrained_text=False: never fetch a separate HF text tower's weights; full-model
        # weights (tag or file) hold the text tower.
        model = oc.create_model(arch, precision="fp32", device="cpu", pretrained_text=False, **kwargs)
    return model.float().eval()


def native_image_size(name: str) -> Tuple[int, int]:
    """The (H, W) image size open_clip's config of `name` builds the model for."""
    native = import_open_clip().get_model_config(open_clip_architecture(name))["vision_cfg"].get("image_size", 224)
    return tuple(native) if isinstance(native, (list, tuple)) else (native, native)


def build_open_clip(name: str, pretrained: str = "", checkpoint: str = "", input_size: Optional[int] = None,
                    download_root: str = "", seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """Build a frozen open_clip model in fp32 on the CPU.

    Args:
        name: an open_clip model name (MODEL.REGIONSPOT.CLIP.NAME), or "tiny" / "tiny-timm".
        pretrained: an open_clip pretrained tag of `name` (CLIP.PRETRAINED): the weights when
            `checkpoint` is "", and the image normalisation in every case.
        checkpoint: "" = the `pretrained` tag's weights (required, but for the tiny models); "random" = random
            init; otherwise a local path, http(s) URL or regionspot://<file> of weights open_clip
            reads (gzip-compressed or not), CLIP.CHECKPOINT.
        input_size: square image size the model is built for (CLIP.INPUT_SIZE; None = native).
        download_root: open_clip's cache folder for tag downloads ("" = its default).
        seed: seed of a random initialisation (MODEL.REGIONSPOT.RANDOM_INIT_SEED).
    """
    oc = import_open_clip()
    arch = open_clip_architecture(name)
    if pretrained and not oc.get_pretrained_cfg(arch, pretrained):
        tags = oc.list_pretrained_tags_by_model(arch)
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} (MODEL.REGIONSPOT.CLIP.PRETRAINED) for "
                         f"{name!r} (MODEL.REGIONSPOT.CLIP.NAME); its tags: {', '.join(tags) or 'none'}.")
    if pretrained:
        # A tag trained with QuickGELU under a plain-GELU name (e.g. ViT-L-14 + dfn2b) would build
        # a model of plausible but wrong features; open_clip checks it only when it downloads.
        tag_quick = bool(oc.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
        if tag_quick != bool(oc.get_model_config(arch).get("quick_gelu", False)):
            fix = f"{arch}-quickgelu" if tag_quick else arch.replace("-quickgelu", "")
            raise ValueError(f"The {pretrained!r} weights (MODEL.REGIONSPOT.CLIP.PRETRAINED) were trained "
                             f"{'with' if tag_quick else 'without'} QuickGELU, which open_clip model {name!r} "
                             f"(MODEL.REGIONSPOT.CLIP.NAME) does not match: use {fix!r}.")
    native = native_image_size(name)
    if input_size and native != (input_size, input_size):
        logger.info(f"open_clip {name} is built for {native} px; running it at {input_size} px "
                    "(MODEL.REGIONSPOT.CLIP.INPUT_SIZE), positional embeddings resampled by open_clip.")
    kwargs = dict(force_image_size=input_size or None, cache_dir=download_root or None)
    stats = pretrained_preprocess_cfg(arch, pretrained)
    if checkpoint == "" and not pretrained and name not in TINY_MODELS:
        raise ValueError(f"open_clip {name!r} (MODEL.REGIONSPOT.CLIP.NAME) needs weights: set MODEL.REGIONSPOT.CLIP."
                         f"PRETRAINED to one of its tags ({', '.join(oc.list_pretrained_tags_by_model(arch)) or 'none'}), "
                         f"or {CHECKPOINT_KEY} to a weights file (\"random\" for random weights).")
    if checkpoint == "random" or (checkpoint == "" and not pretrained):
        return _create(oc, arch, seed, pretrained=None, force_preprocess_cfg=stats, **kwargs)
    if checkpoint == "":
        try:
            return _create(oc, arch, seed, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f"open_clip could not load the {pretrained!r} weights (MODEL.REGIONSPOT.CLIP.PRETRAINED) of {name!r} "
                f"({type(e).__name__}: {e}). Fetch them once on a connected machine (open_clip caches them in "
                f"CLIP.DOWNLOAD_ROOT or its default folder), or set {CHECKPOINT_KEY} to a local weights file."
            ) from e
    local = resolve_weights(checkpoint, f"open_clip {name} checkpoint", CHECKPOINT_KEY)
    # A corrupt file or another model's weights can make the loaders raise almost anything: each
    # is reported with the file and the key, the original chained as the cause.
    try:
        with _plain_weights_file(local) as path:
            try:  # open_clip reads the file with torch.load(weights_only=True)
                return _create(oc, arch, seed, pretrained=path, force_preprocess_cfg=stats, **kwargs)
            except pickle.UnpicklingError:
                torch_load(path, local, CHECKPOINT_KEY)  # a class it refused: say which, and where
                raise
    except UnsafeFileError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"The open_clip checkpoint {local} ({CHECKPOINT_KEY}) is corrupt, truncated or not weights of the "
            f"open_clip model {name!r} (MODEL.REGIONSPOT.CLIP.NAME) as released, at its native image size "
            f"{native[0]} ({type(e).__name__}: {e})."
        ) from e


@VISION_LANGUAGE_ENCODER_REGISTRY.register()
class OpenClipImageTextEncoder(nn.Module):
    """Wraps a frozen open_clip model: images -> token maps (B, P + g*g, W), prompts -> text
    embeddings; the interface of `ClipImageTextEncoder`.

    The open_clip family (CLIP.BACKEND open_clip): `OpenClipImageTextEncoder(cfg)` builds the
    model cfg.MODEL.REGIONSPOT.CLIP describes."""

    BACKEND = "open_clip"

    @configurable
    def __init__(self, clip_model: nn.Module, name: str, input_size: int = 224, resize_mode: str = "bilinear",
                 antialias: bool = False):
        """
        Args:
            clip_model: a built open_clip model (frozen by the caller), built for `input_size`.
            name: its name (MODEL.REGIONSPOT.CLIP.NAME): chooses the tokenizer, part of the text
                fingerprint.
            input_size: side of the square image the model sees.
            resize_mode, antialias: how the whole image is squashed to that square (as
                `ClipImageTextEncoder`).
        """
        super().__init__()
        oc = import_open_clip()
        check_resize_mode(resize_mode)
        self.clip_model = clip_model
        self.name = name
        self.arch = open_clip_architecture(name)
        self.input_size = int(input_size)
        self.resize_mode = resize_mode
        self.antialias = bool(antialias)
        visual = clip_model.visual
        if isinstance(visual, oc.transformer.VisionTransformer):
            self._blocks: Sequence[nn.Module] = visual.transformer.resblocks
            self._width = visual.transformer.width
            self._num_prefix_tokens = 1  # open_clip's ViT always has its class token
            patch, image_size = visual.patch_size, visual.image_size
        elif isinstance(visual, oc.timm_model.TimmModel) and _has_token_map(visual.trunk):
            trunk = visual.trunk
            self._blocks = trunk.blocks
            self._width = trunk.embed_dim
            self._num_prefix_tokens = trunk.num_prefix_tokens
            patch, image_size = trunk.patch_embed.patch_size, trunk.patch_embed.img_size
        else:
            tower = type(getattr(visual, "trunk", visual)).__name__
            raise ValueError(f"The vision tower of open_clip {name!r} (MODEL.REGIONSPOT.CLIP.NAME) is a {tower}, "
                             "which has no transformer token map for RegionSpot: choose a ViT model (open_clip's "
                             "VisionTransformer, or a timm ViT / EVA trunk such as SigLIP's).")
        # The patch embedding drops a remainder (SigLIP SO400M/14 at its own 384 px sees 27 x 27
        # patches): allowed at the size the model was released for, refused elsewhere.
        native = native_image_size(name) if name in available_open_clip_models() else None
        if any(self.input_size % p for p in patch) and native != (self.input_size, self.input_size):
            raise ValueError(f"CLIP input size {self.input_size} (MODEL.REGIONSPOT.CLIP.INPUT_SIZE) is not a "
                             f"multiple of the patch size {tuple(patch)} of open_clip {name!r}.")
        if tuple(image_size) != (self.input_size, self.input_size):
            raise ValueError(f"open_clip {name!r} is built for {tuple(image_size)} images, not the input size "
                             f"{self.input_size} (MODEL.REGIONSPOT.CLIP.INPUT_SIZE): build it with "
                             "build_open_clip(..., input_size=...).")
        pre = oc.get_model_preprocess_cfg(clip_model)
        self.register_buffer("pixel_mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pre["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        self._tokenizer = None

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.REGIONSPOT
        check_resize_mode(c.CLIP.RESIZE_MODE)  # before building a possibly large model
        model = build_open_clip(c.CLIP.NAME, c.CLIP.PRETRAINED, c.CLIP.CHECKPOINT, c.CLIP.INPUT_SIZE,
                                c.CLIP.DOWNLOAD_ROOT, c.RANDOM_INIT_SEED)
        return {"clip_model": model, "name": c.CLIP.NAME, "input_size": c.CLIP.INPUT_SIZE,
                "resize_mode": c.CLIP.RESIZE_MODE, "antialias": c.CLIP.ANTIALIAS}

    def compile_targets(self, autocast: bool = False) -> Tuple[nn.Module, ...]:
        """The modules `compile_frozen` compiles: the image tower's transformer blocks, one by one.
        `forward_intermediates` calls each block (not the tower's or the trunk's `forward`), so
        compiling blocks is what takes effect; identical blocks share one compiled graph."""
        return tuple(self._blocks)

    def text_fingerprint(self) -> str:
        """A short digest of the text tower (its tensors' names, shapes and first values) and the
        model's name (which picks the tokenizer and the activation, e.g. QuickGELU): keys the
        text-embedding cache, so embeddings of two models never mix, nor those of clip and open_clip."""
        h = hashlib.sha256(f"open_clip\0{self.arch}".encode())
        for n, p in _text_parameters(self.clip_model):
            h.update(f"{n}{tuple(p.shape)}".encode())
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def width(self) -> int:
        """Width W of the token map: the vision tower's own width."""
        return self._width

    @property
    def text_dim(self) -> int:
        """Width D of the text embeddings, from the text tower's projection."""
        tower = getattr(self.clip_model, "text", self.clip_model)
        proj = getattr(tower, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        if hasattr(tower, "proj"):  # a Hugging Face text tower, built for its output_dim
            return tower.output_dim
        return tower.ln_final.normalized_shape[0]  # no projection: the pooled width

    @property
    def logit_scale(self) -> torch.Tensor:
        # SigLIP models also learn a logit_bias. It is one constant added to every class's logit, so
        # RegionSpot's softmax over the vocabulary ignores it; the head is trained with the scale alone.
        return self.clip_model.logit_scale.exp().reshape(())

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB in [0, 255] -> (3, S, S): the whole image squashed to a square, normalised
        with the model's own mean and std."""
        x = squash_to_square(image, self.input_size, self.resize_mode, self.antialias)
        return ((x - self.pixel_mean) / self.pixel_std)[0]

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, P + (S/p)^2, W): the last block's output, its P
        prefix tokens first, before the final norm and pooling."""
        out = self.clip_model.visual.forward_intermediates(
            images, indices=1, intermediates_only=True, output_fmt="NLC",
            # timm's EVA fails when asked for the prefix tokens it does not have: ask only if any.
            output_extra_tokens=self._num_prefix_tokens > 0,
        )
        tokens = out["image_intermediates"][0]
        if self._num_prefix_tokens:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    @property
    def tokenizer(self):
        """open_clip's tokenizer of the model, at the model's context length (created on first use:
        Hugging Face tokenizers are fetched from the hub then)."""
        if self._tokenizer is None:
            oc = import_open_clip()
            context = oc.get_model_tokenize_cfg(self.clip_model).get("context_length")
            try:
                self._tokenizer = oc.get_tokenizer(self.arch, context_length=context)
            except Exception as e:
                raise RuntimeError(
                    f"Could not load the tokenizer of open_clip {self.name!r} (MODEL.REGIONSPOT.CLIP.NAME) "
                    f"({type(e).__name__}: {e}). Tokenizers of Hugging Face models (SigLIP, ...) are downloaded "
                    "from the hub on first use: run once on a connected machine (they are cached in "
                    "$HF_HOME), or use an embedding file for the vocabulary."
                ) from e
        return self._tokenizer

    def encode_text(self, prompts) -> torch.Tensor:
        """A list of strings -> (N, D) text embeddings, as the model projects them (not normalised)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.clip_model.encode_text(tokens).float()


def _has_token_map(trunk: nn.Module) -> bool:
    """Whether a timm trunk gives its blocks' token maps with the prefix tokens (timm's ViTs, EVAs)."""
    fi = getattr(trunk, "forward_intermediates", None)
    return (fi is not None and "return_prefix_tokens" in inspect.signature(fi).parameters
            and hasattr(trunk, "num_prefix_tokens") and hasattr(trunk, "blocks"))


def _text_parameters(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The text tower's parameters: `model.text` (CustomTextCLIP, CoCa) or, in a plain CLIP, all
    but the vision tower's and the logit scale / bias."""
    tower = getattr(model, "text", None)
    if isinstance(tower, nn.Module):
        return list(tower.named_parameters())
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(("visual.", "logit_"))]
