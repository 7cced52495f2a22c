"""Frozen SAM: image embeddings, and per box prompt a position-aware region token and a mask.

The region token is the mask decoder's first output mask token (the one SAM uses with
``multimask_output=False``). We read it with a forward hook on ``mask_decoder.transformer``,
so the `segment_anything` package is used exactly as published.
"""
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import numpy as np
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from detectron2.config import configurable
from torch import nn

from .region_encoder import REGION_ENCODER_REGISTRY, RegionEncoderBase, boxes_of_mask_records, load_sam_checkpoint
from .sam_attention import use_fused_attention
from .seeding import RANDOM_INIT_SEED, seeded_random_init

SAM_CHECKPOINT_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}


def build_tiny_sam(image_size: int = 256, dim: int = 32) -> Sam:
    """A small SAM built from the package's own classes, for tests and the offline quickstart."""
    patch = 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
            mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=False,
            window_size=0, global_attn_indexes=(0,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")


def build_sam(sam_type: str, checkpoint: str = "", seed: int = RANDOM_INIT_SEED) -> Sam:
    """Build SAM of `sam_type` and load `checkpoint` ("" = official, "random" = random init).

    `seed` fixes the random initialisation (what stays of it when no checkpoint is loaded).
    """
    if sam_type not in SAM_TYPES:
        raise ValueError(
            f"Unknown SAM type {sam_type!r} (MODEL.REGIONSPOT.SAM.TYPE); choose one of {SAM_TYPES}."
        )
    # Random weights come from a fixed seed (without touching the global RNG), so every build and
    # every process gets the same "random" SAM: cached tokens, evaluation and DDP ranks agree.
    with seeded_random_init(seed):
        sam = build_tiny_sam() if sam_type == "tiny" else sam_model_registry[sam_type](checkpoint=None)
    if checkpoint == "" and sam_type != "tiny":
        checkpoint = SAM_CHECKPOINT_URLS[sam_type]
    if checkpoint not in ("", "random"):
        load_sam_checkpoint(sam, checkpoint, sam_type)
    return sam


class ResizeAtLeastOnePixel(ResizeLongestSide):
    """SAM's ResizeLongestSide, but no side shrinks below one pixel. SAM rounds each side, so an
    extreme aspect ratio (e.g. a 4 x 4000 sliver at 256, or 1 x 4000 at 1024) gave a 0-pixel side
    and failed in the resize. Boxes and points are scaled by the same sizes as the image."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(newh, 1), max(neww, 1)


class _PrecomputedSamPredictor(SamPredictor):
    """SamPredictor whose `set_image` reuses an embedding we already computed for the whole image,
    so SAM's automatic mask generator does not run the image encoder a second time. Crops of the
    image (crop_n_layers > 0) are still encoded as SAM does."""

    def __init__(self, sam: Sam, embedding: torch.Tensor, input_size: Tuple[int, int],
                 original_size: Tuple[int, int]):
        super().__init__(sam)
        self.transform = ResizeAtLeastOnePixel(sam.image_encoder.img_size)  # as our embedding was made
        self._embedding, self._input_size, self._original_size = embedding, input_size, original_size

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if tuple(image.shape[:2]) != tuple(self._original_size):
            return super().set_image(image, image_format)
        self.reset_image()
        self.original_size = tuple(self._original_size)
        self.input_size = tuple(self._input_size)
        self.features = self._embedding[None]
        self.is_image_set = True


@REGION_ENCODER_REGISTRY.register()
class SamRegionEncoder(RegionEncoderBase):
    """Wraps a frozen SAM: images -> embeddings, boxes -> (region tokens, low-res mask logits).

    The segment_anything family: `SamRegionEncoder(cfg)` builds the SAM that
    cfg.MODEL.REGIONSPOT.SAM describes."""

    SAM_TYPES = SAM_TYPES
    RANDOM_BY_DEFAULT_TYPES = ("tiny",)  # no official file: CHECKPOINT "" means random

    @configurable
    def __init__(self, sam: Sam, decode_chunk: int = 0, fused_attention: bool = False):
        """
        Args:
            sam: a built SAM (frozen by the caller).
            decode_chunk: boxes per mask-decoder call; 0 = by device (`chunk_for`).
            fused_attention: run the image encoder's attention through `sam_attention`
                (same outputs, less time and memory).
        """
        super().__init__(decode_chunk)
        self.sam = sam
        if fused_attention:
            use_fused_attention(sam.image_encoder)
        self.transform = ResizeAtLeastOnePixel(sam.image_encoder.img_size)
        self._captured: List[torch.Tensor] = []
        self._capturing = False  # only our own decoder calls are read, not e.g. the auto generator's
        sam.mask_decoder.transformer.register_forward_hook(self._capture_tokens)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.REGIONSPOT
        sam = build_sam(c.SAM.TYPE, c.SAM.CHECKPOINT, c.RANDOM_INIT_SEED)
        return {"sam": sam, "decode_chunk": c.SAM.DECODE_CHUNK, "fused_attention": c.SAM.FUSED_ATTENTION}

    def _capture_tokens(self, module, inputs, outputs) -> None:
        # outputs = (tokens after the two-way transformer, image features); token 0 is the IoU
        # token, token 1 the first mask token.
        if self._capturing:
            self._captured.append(outputs[0][:, 1, :])

    def compile_targets(self, autocast: bool = False) -> Tuple[nn.Module, ...]:
        """The modules `compile_frozen` compiles: the image encoder and the mask decoder. Under
        autocast the decoder is compiled as its two heavy parts (two-way transformer, output
        upscaling) rather than whole: inductor's whole-decoder graph returned NaN tokens and
        masks in bf16 on a CPU (SAM ViT-B; each part alone is exact and keeps most of the gain)."""
        decoder = self.sam.mask_decoder
        parts = (decoder.transformer, decoder.output_upscaling) if autocast else (decoder,)
        return (self.sam.image_encoder, *parts)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def mask_threshold(self) -> float:
        return self.sam.mask_threshold

    @property
    def token_dim(self) -> int:
        return self.sam.mask_decoder.transformer_dim

    def preprocess(self, image: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(3, H, W) RGB image, any dtype in [0, 255] -> (normalised padded input, resized size)."""
        h, w = image.shape[-2:]
        newh, neww = self.transform.get_preprocess_shape(h, w, self.image_size)
        x = F.interpolate(
            image[None].float(), (newh, neww), mode="bilinear", align_corners=False, antialias=True
        )
        return self.sam.preprocess(x)[0], (newh, neww)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, C, S/16, S/16) image embeddings."""
        return self.sam.image_encoder(images)

    def decode_prompts(
        self,
        embedding: torch.Tensor,
        original_size: Tuple[int, int],
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        masks: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode N region prompts of one image, in chunks: boxes, point sets, or both per region.

        Args:
            embedding: (C, h, w) SAM image embedding of the image.
            original_size: (H, W) of the image the prompts' pixel coordinates refer to.
            boxes: (N, 4) XYXY boxes, or None.
            points: (N, P, 2) XY points, P per region, or None.
            point_labels: (N, P) SAM point labels: 1 foreground, 0 background, -1 padding.
            masks: False: stop at the region token (`_decode_tokens`); the logits are None.
        Returns region tokens (N, C) and low-resolution mask logits (N, 1, h, w), as
        `SamPredictor.predict_torch(..., multimask_output=False)` would give them.
        """
        if points is not None and point_labels is None:
            raise ValueError("Point prompts need point_labels (1 = foreground, 0 = background).")
        if boxes is not None:
            boxes = self.transform.apply_boxes_torch(boxes.float(), original_size)
        if points is not None:
            points = self.transform.apply_coords_torch(points.float(), original_size)
            point_labels = point_labels.to(device=points.device, dtype=torch.int)
        num = boxes.shape[0] if boxes is not None else (points.shape[0] if points is not None else 0)
        dense_pe = self.sam.prompt_encoder.get_dense_pe()

        def decode(chunk: slice) -> Tuple[torch.Tensor, torch.Tensor]:
            sparse, dense = self.sam.prompt_encoder(
                points=(points[chunk], point_labels[chunk]) if points is not None else None,
                boxes=boxes[chunk] if boxes is not None else None,
                masks=None,
            )
            if not masks:
                return self._decode_tokens(embedding, dense_pe, sparse, dense), None
            self._captured.clear()
            self._capturing = True
            try:
                low_res, _ = self.sam.mask_decoder(
                    image_embeddings=embedding[None],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            finally:
                self._capturing = False
            return self._captured.pop(), low_res

        return self._decode_in_chunks(num, embedding, decode, masks)

    def _decode_tokens(self, embedding: torch.Tensor, dense_pe: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor) -> torch.Tensor:
        """The region tokens of `MaskDecoder.predict_masks` without its masks: the same output-token
        concatenation and two-way transformer, then token 1 (what `_capture_tokens` reads); the
        mask upscaling, hypernetworks and IoU head, which only make masks, are skipped."""
        decoder = self.sam.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        src = torch.repeat_interleave(embedding[None], tokens.shape[0], dim=0)
        src = src + dense
        pos_src = torch.repeat_interleave(dense_pe, tokens.shape[0], dim=0)
        hs, _ = decoder.transformer(src, pos_src, tokens)
        return hs[:, 1, :]

    @torch.no_grad()
    def auto_boxes(self, image: torch.Tensor, embedding: torch.Tensor, input_size: Tuple[int, int],
                   params: Dict) -> torch.Tensor:
        """Boxes (N, 4, XYXY) of SAM's automatic mask generator on a (3, H, W) RGB image, reusing
        its already computed `embedding` (from `encode_images`) instead of encoding it again."""
        rgb = image.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
        generator = SamAutomaticMaskGenerator(self.sam, **params)
        generator.predictor = _PrecomputedSamPredictor(self.sam, embedding, input_size, rgb.shape[:2])
        return boxes_of_mask_records(generator.generate(rgb), embedding.device)

    def _upsample_logits(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                         original_size: Tuple[int, int]) -> torch.Tensor:
        """SAM's own `postprocess_masks`: upsample to the padded S x S input, crop, resize."""
        return self.sam.postprocess_masks(low_res, input_size, original_size)

    def _upsample_stages(self, input_size: Tuple[int, int], original_size: Tuple[int, int]):
        """`postprocess_masks`' resizes per axis: low-res to the S x S frame, kept to the resized
        image's side; then that side to the original size (see `RegionEncoderBase.mask_windows`)."""
        return tuple([(0.25, input_size[a]), (input_size[a] / original_size[a], original_size[a])] for a in (0, 1))
