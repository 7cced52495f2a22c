"""Frozen SAM 2.1 as RegionSpot's localization backbone (extra `regionspot[sam2]`).

`Sam2RegionEncoder` has the methods of `SamRegionEncoder`, so every caller takes either. The
`sam2` package is used as published: the model is built by `sam2.build_sam.build_sam2` from the
package's own configs, images go through its `SAM2Transforms`, features are computed as
`SAM2ImagePredictor.set_image` computes them (with the model's own methods), and prompts are
encoded and decoded as `SAM2ImagePredictor._predict(..., multimask_output=False)` does. The
region token is the mask decoder's third output (`sam_tokens_out`: mask token 0, the one SAM 2
also uses as its object pointer).

The family registers itself when this module is imported, but imports `sam2` only when a SAM 2
type is built (`import_sam2`), so RegionSpot works without the package.
"""
from __future__ import annotations  # annotations name sam2's classes, imported on demand

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from torch import nn

from ...utils.extras import require_extra
from .region_encoder import REGION_ENCODER_REGISTRY, RegionEncoderBase, boxes_of_mask_records, load_sam_checkpoint
from .seeding import RANDOM_INIT_SEED, seeded_random_init

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


def import_sam2() -> ModuleType:
    """The `sam2` package with the modules this family uses loaded, or MissingExtraError naming
    the extra."""
    require_extra("sam2.build_sam", "sam2", "SAM 2 (MODEL.REGIONSPOT.SAM.TYPE sam2.1_hiera_* or sam2_tiny)")
    import sam2.automatic_mask_generator  # noqa: F401
    import sam2.build_sam  # noqa: F401
    import sam2.sam2_image_predictor  # noqa: F401
    import sam2.utils.transforms  # noqa: F401

    return sam2

_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
# SAM.TYPE -> (the sam2 package's model config, official checkpoint; "" = none: random weights).
SAM2_MODELS: Dict[str, Tuple[str, str]] = {
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", _URL + "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", _URL + "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", _URL + "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", _URL + "sam2.1_hiera_large.pt"),
    "sam2_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", ""),
}
# "sam2_tiny": the Hiera-T config shrunk by hydra overrides, for tests: 256-pixel input, a
# 5-block Hiera of width 8, 32-wide FPN neck, prompt encoder and mask decoder (the decoder's
# depth, heads and MLP width are fixed by SAM2Base), and a small memory path (unused on images).
SAM2_TINY_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=32",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
)


def build_sam2_model(sam_type: str, checkpoint: str = "", seed: int = RANDOM_INIT_SEED) -> SAM2Base:
    """Build SAM 2 of `sam_type` (a `SAM2_MODELS` key) on the CPU in eval mode with the package's
    `build_sam2`, and load `checkpoint` ("" = the official one, "sam2_tiny": none; "random" = none).

    `seed` fixes the random initialisation (what stays of it when no checkpoint is loaded).
    `build_sam2`'s default post-processing stays on: with `multimask_output=False` its decoder
    falls back to the best multimask mask when the single mask is unstable, as SAM 2's image
    predictor does; the region token is mask token 0 either way.
    """
    if sam_type not in SAM2_MODELS:
        raise ValueError(f"Unknown SAM 2 type {sam_type!r} (MODEL.REGIONSPOT.SAM.TYPE); choose one of "
                         f"{tuple(SAM2_MODELS)}.")
    config, official = SAM2_MODELS[sam_type]
    overrides = list(SAM2_TINY_OVERRIDES) if sam_type == "sam2_tiny" else []
    build_sam2 = import_sam2().build_sam.build_sam2
    # Random weights from a fixed seed without touching the global RNG, as `build_sam` does.
    with seeded_random_init(seed):
        model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    checkpoint = checkpoint or official
    if checkpoint not in ("", "random"):
        load_sam_checkpoint(model, checkpoint, sam_type)
    return model


class Sam2Features(NamedTuple):
    """SAM 2's features of one image: what `SAM2ImagePredictor.set_image` keeps in `_features`,
    without the batch dimension."""

    image_embed: torch.Tensor  # (C, S/16, S/16), no-memory embedding added
    high_res_feats: Tuple[torch.Tensor, ...]  # (C/8, S/4, S/4), (C/4, S/8, S/8): the decoder's skips


def _feature_sizes(model: SAM2Base) -> List[Tuple[int, int]]:
    """(h, w) of the backbone levels the decoder reads, finest first (strides 4, 8, 16)."""
    e = model.sam_image_embedding_size
    return [(4 * e, 4 * e), (2 * e, 2 * e), (e, e)][-model.num_feature_levels:]


@functools.lru_cache(maxsize=None)
def _precomputed_predictor_class() -> type:
    """`_PrecomputedSam2Predictor`, defined on first use: it subclasses a class of the optional
    `sam2` package."""

    class _PrecomputedSam2Predictor(import_sam2().sam2_image_predictor.SAM2ImagePredictor):
        """SAM2ImagePredictor whose `set_image` installs features we already computed for the whole
        image, so SAM 2's automatic mask generator does not run the image encoder again. Other images
        (crops, with crop_n_layers > 0) are encoded as the package does, at this model's feature sizes
        (the package's predictor assumes a 1024-pixel input)."""

        def __init__(self, model: SAM2Base, features: Sam2Features, original_size: Tuple[int, int], **kwargs):
            super().__init__(model, **kwargs)
            self._bb_feat_sizes = _feature_sizes(model)
            self._precomputed, self._precomputed_hw = features, tuple(original_size)

        def set_image(self, image) -> None:
            if not isinstance(image, np.ndarray) or tuple(image.shape[:2]) != self._precomputed_hw:
                return super().set_image(image)
            self.reset_predictor()
            self._orig_hw = [self._precomputed_hw]
            self._features = {"image_embed": self._precomputed.image_embed[None],
                              "high_res_feats": [f[None] for f in self._precomputed.high_res_feats]}
            self._is_image_set = True

    return _PrecomputedSam2Predictor


@REGION_ENCODER_REGISTRY.register()
class Sam2RegionEncoder(RegionEncoderBase):
    """Wraps a frozen SAM 2: images -> features, prompts -> (region tokens, low-res mask logits).

    SAM 2 squashes every image to its S x S input (no padding), so `preprocess` gives the input
    size (S, S) and the shared mask pasting maps pixels with that. The SAM 2.1 family:
    `Sam2RegionEncoder(cfg)` builds the model cfg.MODEL.REGIONSPOT.SAM describes
    (SAM.FUSED_ATTENTION concerns SAM's ViT only and is ignored: Hiera uses torch's fused
    attention already).
    """

    SAM_TYPES = tuple(SAM2_MODELS)
    RANDOM_BY_DEFAULT_TYPES = tuple(t for t, (_, url) in SAM2_MODELS.items() if not url)

    @configurable
    def __init__(self, sam: SAM2Base, decode_chunk: int = 0):
        """
        Args:
            sam: a built SAM 2 (`build_sam2_model`; frozen by the caller).
            decode_chunk: prompts per mask-decoder call; 0 = by device (`chunk_for`).
        """
        super().__init__(decode_chunk)
        self.sam = sam
        # The image predictor's transforms and mask threshold (its default, 0).
        self.transforms = import_sam2().utils.transforms.SAM2Transforms(resolution=sam.image_size, mask_threshold=0.0)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.REGIONSPOT
        return {"sam": build_sam2_model(c.SAM.TYPE, c.SAM.CHECKPOINT, c.RANDOM_INIT_SEED),
                "decode_chunk": c.SAM.DECODE_CHUNK}

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    @property
    def mask_threshold(self) -> float:
        return self.transforms.mask_threshold

    @property
    def token_dim(self) -> int:
        return self.sam.sam_mask_decoder.transformer_dim

    def compile_targets(self, autocast: bool = False) -> Tuple[nn.Module, ...]:
        """The modules `compile_frozen` compiles: the image encoder and the whole mask decoder,
        with or without autocast. Unlike SAM's, SAM 2's decoder stays finite compiled whole in
        bf16 on a CPU, while its two-way transformer compiled alone gave NaN tokens and masks
        there (sam2_tiny, torch 2.14; compiled whole, tokens are within 1e-6 of eager in fp32 and
        0.03 in bf16)."""
        return (self.sam.image_encoder, self.sam.sam_mask_decoder)

    def preprocess(self, image: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(3, H, W) RGB image, any dtype in [0, 255] -> (normalised S x S input, (S, S)), as
        `SAM2Transforms` makes it from an image array (antialiased resize, ImageNet statistics)."""
        x = self.transforms.transforms(image.float() / 255.0)
        return x, (self.image_size, self.image_size)

    def encode_images(self, images: torch.Tensor) -> List[Sam2Features]:
        """(B, 3, S, S) preprocessed images -> per image its `Sam2Features`, computed as
        `SAM2ImagePredictor.set_image_batch` does."""
        backbone_out = self.sam.forward_image(images)
        _, vision_feats, _, feat_sizes = self.sam._prepare_backbone_features(backbone_out)
        if self.sam.directly_add_no_mem_embed:  # as the package's image predictor does
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        b = images.shape[0]
        feats = [f.permute(1, 2, 0).view(b, -1, *size) for f, size in zip(vision_feats, feat_sizes)]
        return [Sam2Features(feats[-1][i], tuple(f[i] for f in feats[:-1])) for i in range(b)]

    def decode_prompts(
        self,
        embedding: Sam2Features,
        original_size: Tuple[int, int],
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        masks: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode N region prompts of one image, in chunks: boxes, point sets, or both per region.

        Args:
            embedding: the image's `Sam2Features` (an item of `encode_images`).
            original_size: (H, W) of the image the prompts' pixel coordinates refer to.
            boxes: (N, 4) XYXY boxes, or None.
            points: (N, P, 2) XY points, P per region, or None.
            point_labels: (N, P) SAM point labels: 1 foreground, 0 background, -1 padding.
            masks: False: stop at the region token (`_decode_tokens`); the logits are None.
        Returns region tokens (N, C) and low-resolution mask logits (N, 1, S/4, S/4), as
        `SAM2ImagePredictor._predict(..., multimask_output=False)` computes them (its low-res
        output is these logits clamped to [-32, 32]).
        """
        if points is not None and point_labels is None:
            raise ValueError("Point prompts need point_labels (1 = foreground, 0 = background).")
        coords, labels = None, None
        if points is not None:
            coords = self.transforms.transform_coords(points.float(), normalize=True, orig_hw=original_size)
            labels = point_labels.to(device=coords.device, dtype=torch.int)
        if boxes is not None:
            # A box is its two corners, labelled 2 and 3, before any points (as `_predict` does).
            corners = self.transforms.transform_boxes(boxes.float(), normalize=True, orig_hw=original_size)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).repeat(corners.shape[0], 1)
            coords = corners if coords is None else torch.cat([corners, coords], dim=1)
            labels = corner_labels if labels is None else torch.cat([corner_labels, labels], dim=1)
        num = 0 if coords is None else coords.shape[0]
        image_embed = embedding.image_embed[None]
        high_res = [f[None] for f in embedding.high_res_feats]
        dense_pe = self.sam.sam_prompt_encoder.get_dense_pe()

        def decode(chunk: slice) -> Tuple[torch.Tensor, torch.Tensor]:
            sparse, dense = self.sam.sam_prompt_encoder(points=(coords[chunk], labels[chunk]), boxes=None, masks=None)
            if not masks:
                return self._decode_tokens(image_embed, dense_pe, sparse, dense), None
            low_res, _, sam_tokens, _ = self.sam.sam_mask_decoder(
                image_embeddings=image_embed,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=sparse.shape[0] > 1,  # `_predict`'s batched mode: one image, many prompts
                high_res_features=high_res,
            )
            return sam_tokens[:, 0], low_res

        return self._decode_in_chunks(num, image_embed, decode, masks)

    def _decode_tokens(self, image_embed: torch.Tensor, dense_pe: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor) -> torch.Tensor:
        """The region tokens of SAM 2's `MaskDecoder.predict_masks` without its masks: the same
        output-token concatenation (object-score token first when the model has one), image
        repetition and two-way transformer, then mask token 0 (its `sam_tokens_out` with
        `multimask_output=False`); the upscaling with the high-res features, hypernetworks and
        IoU and object-score heads, which only make masks, are skipped."""
        decoder = self.sam.sam_mask_decoder
        weights = [decoder.iou_token.weight, decoder.mask_tokens.weight]
        s = 1 if decoder.pred_obj_scores else 0
        if decoder.pred_obj_scores:
            weights.insert(0, decoder.obj_score_token.weight)
        output_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        src = torch.repeat_interleave(image_embed, tokens.shape[0], dim=0) if sparse.shape[0] > 1 else image_embed
        src = src + dense
        pos_src = torch.repeat_interleave(dense_pe, tokens.shape[0], dim=0)
        hs, _ = decoder.transformer(src, pos_src, tokens)
        return hs[:, s + 1, :]

    @torch.no_grad()
    def auto_boxes(self, image: torch.Tensor, embedding: Sam2Features, input_size: Tuple[int, int],
                   params: Dict) -> torch.Tensor:
        """Boxes (N, 4, XYXY) of SAM 2's automatic mask generator (`SAM2AutomaticMaskGenerator`
        with `params`: points_per_side, pred_iou_thresh, stability_score_thresh,
        min_mask_region_area, ...) on a (3, H, W) RGB image, reusing its already computed
        `embedding` (from `encode_images`) instead of encoding it again. `input_size` is always
        (S, S) for SAM 2 and not needed."""
        rgb = image.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
        generator = import_sam2().automatic_mask_generator.SAM2AutomaticMaskGenerator(self.sam, **params)
        own = generator.predictor._transforms  # keeps the generator's hole / sprinkle settings
        generator.predictor = _precomputed_predictor_class()(
            self.sam, embedding, rgb.shape[:2], mask_threshold=own.mask_threshold,
            max_hole_area=own.max_hole_area, max_sprinkle_area=own.max_sprinkle_area)
        return boxes_of_mask_records(generator.generate(rgb), embedding.image_embed.device)

    def _upsample_logits(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                         original_size: Tuple[int, int]) -> torch.Tensor:
        """SAM 2's own `SAM2Transforms.postprocess_masks` (one bilinear resize from the low-res
        logits to the original size; no hole filling), as its image predictor pastes masks."""
        return self.transforms.postprocess_masks(low_res, original_size)
