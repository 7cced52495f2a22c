"""The base of every region encoder family (SAM, SAM 2, yours): the registry of families, and what
they share: decoder chunking, box decoding, mask pasting from the low-res logits, boxes of the
automatic mask generator's records, and the checkpoint fit check.

Each encoder (`SamRegionEncoder`, `Sam2RegionEncoder`) names its own square input side
(`image_size`), mask threshold, prompt decoding and full-size upsampling of mask logits; the
callers (pipeline, predictor, token extraction, prompt sources, benchmark) only use the methods
defined or declared here plus `preprocess`, `encode_images`, `auto_boxes`, `token_dim` and
`compile_targets`.
"""
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils.logger import log_first_n
from detectron2.utils.registry import Registry
from torch import nn

from ...utils.weights import load_weights_file

REGION_ENCODER_REGISTRY = Registry("REGION_ENCODER")
REGION_ENCODER_REGISTRY.__doc__ = """
Region encoder families (frozen SAM-like models), built by `build_sam_encoder(cfg)`.

A registered class subclasses `RegionEncoderBase`, names in `SAM_TYPES` the
MODEL.REGIONSPOT.SAM.TYPE values it builds (and in `RANDOM_BY_DEFAULT_TYPES` those whose
SAM.CHECKPOINT "" means random weights: no official file), and is built as
`cls(cfg)`: a detectron2 `@configurable` constructor whose `from_config(cls, cfg)` builds the model.
"""

# Why SAM's automatic mask generator may give an image no box at all, and what to change.
SAM_AUTO_EMPTY_HINT = (
    "SAM's automatic mask generator kept no mask: its predicted-IoU and stability thresholds filtered "
    "every candidate (with random or tiny SAM weights they filter everything). Lower "
    "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH and STABILITY_SCORE_THRESH (the tiny model needs 0 "
    "for both), or give box prompts instead."
)
SAM_CHECKPOINT_KEY = "MODEL.REGIONSPOT.SAM.CHECKPOINT"


def load_sam_checkpoint(model: nn.Module, checkpoint: str, sam_type: str) -> None:
    """Load a SAM or SAM 2 checkpoint (local path, URL or regionspot://; a state dict, or one under
    "model" as the official files hold it) into `model`, which it must fit exactly: any missing,
    unexpected or misshapen key is an error naming SAM.CHECKPOINT, the file and the SAM type."""
    state = load_weights_file(checkpoint, f"SAM {sam_type} checkpoint", SAM_CHECKPOINT_KEY)
    state = state.get("model", state)
    try:
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # other shapes, non-tensor values, ...
        raise RuntimeError(
            f"SAM checkpoint {checkpoint} ({SAM_CHECKPOINT_KEY}) does not fit SAM type "
            f"{sam_type!r}: {type(e).__name__}: {e}"
        ) from e
    if missing or unexpected:
        raise RuntimeError(
            f"SAM checkpoint {checkpoint} ({SAM_CHECKPOINT_KEY}) does not fit SAM type {sam_type!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )


def boxes_of_mask_records(records: List[Dict], device: torch.device) -> torch.Tensor:
    """(N, 4) XYXY boxes of an automatic mask generator's records (their XYWH "bbox"), with the
    hint logged once when there are none."""
    if not records:
        log_first_n(logging.WARNING, SAM_AUTO_EMPTY_HINT + " (logged once)", n=1,
                    name="regionspot.modeling.encoders.region_encoder")
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32, device=device)
    boxes = boxes.view(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
    return boxes


class RegionEncoderBase(nn.Module):
    """A frozen SAM-like wrapper: region prompts -> (region tokens, low-res mask logits), and the
    low-res logits -> masks. Low-res logits cover the square S x S input frame (S = `image_size`)
    at S/4 per side; the resized image fills its top-left `input_size` corner (all of it when the
    encoder squashes the image to the square, as SAM 2 does).

    A family registered in `REGION_ENCODER_REGISTRY` sets these two class attributes.
    """

    SAM_TYPES: Tuple[str, ...] = ()  # the MODEL.REGIONSPOT.SAM.TYPE values the family builds
    RANDOM_BY_DEFAULT_TYPES: Tuple[str, ...] = ()  # those of them whose CHECKPOINT "" means random

    def __init__(self, decode_chunk: int = 0):
        """
        Args:
            decode_chunk: boxes per mask-decoder call; 0 = by device (`chunk_for`).
        """
        super().__init__()
        if int(decode_chunk) < 0:
            raise ValueError(f"MODEL.REGIONSPOT.SAM.DECODE_CHUNK must be >= 0 (0 = by device), got {decode_chunk}.")
        self.decode_chunk = int(decode_chunk)

    @property
    def image_size(self) -> int:
        """Side S of the square input frame."""
        raise NotImplementedError

    @property
    def mask_threshold(self) -> float:
        """Logit above which a pixel is in the mask."""
        raise NotImplementedError

    def decode_prompts(self, embedding, original_size: Tuple[int, int], boxes: Optional[torch.Tensor] = None,
                       points: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _upsample_logits(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                         original_size: Tuple[int, int]) -> torch.Tensor:
        """The SAM package's own full-size mask logits (N, 1, H, W) from low-res ones: the plain
        (not `fast`) paste."""
        raise NotImplementedError

    def chunk_for(self, device: torch.device) -> int:
        """Boxes per decoder call on `device`: DECODE_CHUNK, or when 0, 4 on a CPU (measured
        fastest: the per-box 4096x256 activations stay in cache) and 64 on accelerators."""
        if self.decode_chunk:
            return self.decode_chunk
        return 4 if device.type == "cpu" else 64

    def _decode_in_chunks(self, num: int, like: torch.Tensor,
                          decode: Callable[[slice], Tuple[torch.Tensor, torch.Tensor]]
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`decode(chunk)` -> (tokens, low-res logits) over `num` prompts, `chunk_for` at a time,
        concatenated; no prompts give empty (0, C) tokens and (0, 1, S/4, S/4) logits like `like`."""
        step = self.chunk_for(like.device)
        out = [decode(slice(start, start + step)) for start in range(0, num, step)]
        if not out:
            n = self.image_size // 4
            return like.new_zeros((0, self.token_dim)), like.new_zeros((0, 1, n, n))
        return torch.cat([t for t, _ in out]), torch.cat([m for _, m in out])

    def decode_boxes(self, embedding, boxes: torch.Tensor, original_size: Tuple[int, int]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode boxes (N, 4, XYXY in original pixels) of one image, in chunks.

        Returns region tokens (N, C) and low-resolution mask logits (N, 1, h, w).
        """
        return self.decode_prompts(embedding, original_size, boxes=boxes)

    def paste_masks(
        self, low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
        fast: bool = False, chunk: int = 16,
    ) -> torch.Tensor:
        """Low-res mask logits (N, 1, h, w) -> boolean masks (N, H, W) at the original size.

        The plain way is the SAM package's own upsampling (`_upsample_logits`; for SAM: upsample
        to the padded S x S input, crop the image, resize to the original size). `fast=True`
        samples the original-size grid straight from the low-res logits, one bilinear
        interpolation without an S x S buffer; tests check the two agree (IoU >= 0.99).
        Masks are pasted `chunk` at a time, so the float buffers stay bounded.
        """
        if low_res.shape[0] == 0:
            return torch.zeros((0, *original_size), dtype=torch.bool, device=low_res.device)
        return torch.cat([self._paste_chunk(c, input_size, original_size, fast) for c in low_res.split(chunk)])

    def box_masks(self, low_res: torch.Tensor, input_size: Tuple[int, int], image_size: Tuple[int, int],
                  boxes: torch.Tensor, size: int = 112) -> torch.Tensor:
        """Mask probabilities (N, 1, size, size) on a grid over each box (XYXY in `image_size`
        pixels), sampled from SAM's low-res logits: the box-local masks detectron2's
        `detector_postprocess` pastes (threshold 0.5, i.e. SAM's logit threshold)."""
        if boxes.shape[0] == 0:
            return low_res.new_zeros((0, 1, size, size), dtype=torch.float32)
        S = float(self.image_size)
        steps = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size  # (size,)
        x0, y0, x1, y1 = boxes.float().unbind(dim=1)
        xs = x0[:, None] + (x1 - x0)[:, None] * steps  # (N, size) image pixels
        ys = y0[:, None] + (y1 - y0)[:, None] * steps
        gx = xs * (input_size[1] / image_size[1]) * (2.0 / S) - 1.0
        gy = ys * (input_size[0] / image_size[0]) * (2.0 / S) - 1.0
        grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)
        logits = F.grid_sample(low_res.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (logits - self.mask_threshold).sigmoid()

    def _paste_chunk(self, low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                     fast: bool) -> torch.Tensor:
        if not fast:
            masks = self._upsample_logits(low_res.float(), input_size, original_size)
            return masks[:, 0] > self.mask_threshold
        H, W = original_size
        S = float(self.image_size)
        dev = low_res.device
        # Output pixel centres, mapped into the padded input frame, as grid_sample's [-1, 1]
        # coordinates over the low-res map (align_corners=False convention).
        gy = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) * (input_size[0] / H) * (2.0 / S) - 1.0
        gx = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) * (input_size[1] / W) * (2.0 / S) - 1.0
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        grid = grid[None].expand(low_res.shape[0], H, W, 2)
        masks = F.grid_sample(low_res.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return masks[:, 0] > self.mask_threshold
