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

from ...mask_rle import bilinear_pays_off, bilinear_run_lengths, has_float64, run_lengths
from ...structures import RunLengthMasks
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
                       points: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None,
                       masks: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Region tokens (N, C) and low-res mask logits (N, 1, h, w) of N prompts; with
        `masks=False` the decoder stops at the region token (its mask upscaling, hypernetworks
        and IoU head are skipped) and the logits are None."""
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
                          decode: Callable[[slice], Tuple[torch.Tensor, Optional[torch.Tensor]]], masks: bool = True
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`decode(chunk)` -> (tokens, low-res logits or None) over `num` prompts, `chunk_for` at a
        time, concatenated; no prompts give empty (0, C) tokens and (0, 1, S/4, S/4) logits like
        `like`. Logits are None when `masks` is False."""
        step = self.chunk_for(like.device)
        out = [decode(slice(start, start + step)) for start in range(0, num, step)]
        n = self.image_size // 4
        tokens = torch.cat([t for t, _ in out]) if out else like.new_zeros((0, self.token_dim))
        if not masks:
            return tokens, None
        return tokens, torch.cat([m for _, m in out]) if out else like.new_zeros((0, 1, n, n))

    def decode_boxes(self, embedding, boxes: torch.Tensor, original_size: Tuple[int, int], masks: bool = True
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode boxes (N, 4, XYXY in original pixels) of one image, in chunks.

        Returns region tokens (N, C) and low-resolution mask logits (N, 1, h, w), None without `masks`.
        """
        return self.decode_prompts(embedding, original_size, boxes=boxes, masks=masks)

    # Float elements a paste samples at once (masks x window pixels): bounds its buffers at any image size.
    paste_pixels = 1 << 22

    def paste_masks(
        self, low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
        fast: bool = False, chunk: int = 16, return_windows: bool = False, windows: Optional[torch.Tensor] = None,
    ):
        """Low-res mask logits (N, 1, h, w) -> boolean masks (N, H, W) at the original size.

        The plain way is the SAM package's own upsampling (`_upsample_logits`; for SAM: upsample
        to the padded S x S input, crop the image, resize to the original size). `fast=True`
        samples the original-size grid straight from the low-res logits, one bilinear
        interpolation without an S x S buffer; tests check the two agree (IoU >= 0.99).

        A mask can only be True near low-res cells above the threshold: each output pixel is a
        convex combination of a few cells, so where they are all <= 0 it is <= 0 too. Each mask's
        window (`mask_windows`) bounds that, and the fast paste samples only there (windows of
        similar size together, `paste_pixels` samples at a time); the rest stays False, so the
        masks are those of the whole grid, pixel for pixel. The plain paste samples the whole
        image of each mask whose window is not empty (a windowed resize would compute its source
        coordinates from other sizes and round differently), at most `chunk` masks and
        `paste_pixels` pixels at a time.

        Returns the masks, and with `return_windows` also their (N, 4) windows `y0, y1, x0, x1`
        (False outside; `regionspot.mask_rle` encodes a mask from its window's columns). `windows`:
        those of `mask_windows(..., fast)` when the caller has them.
        """
        n = low_res.shape[0]
        if windows is None:
            windows = self.mask_windows(low_res, input_size, original_size, fast)
        # Unless the paste writes every pixel of every mask, all are False first.
        sizes = torch.stack([windows[:, 1] - windows[:, 0], windows[:, 3] - windows[:, 2]], dim=1)
        written = (sizes == sizes.new_tensor(original_size)).all(dim=1) if fast else (sizes > 0).all(dim=1)
        if bool(written.all()):
            masks = torch.empty((n, *original_size), dtype=torch.bool, device=low_res.device)
        else:
            masks = torch.zeros((n, *original_size), dtype=torch.bool, device=low_res.device)
        if n:
            if fast:
                self._paste_windows(low_res, windows, input_size, original_size, masks)
            else:
                self._paste_plain(low_res, windows, input_size, original_size, masks, chunk)
        return (masks, windows) if return_windows else masks

    def _upsample_stages(self, input_size: Tuple[int, int], original_size: Tuple[int, int]
                         ) -> Tuple[List[Tuple[float, int]], List[Tuple[float, int]]]:
        """The bilinear resizes of `_upsample_logits`, per axis (rows, columns): (scale = input /
        output size, output positions kept after the resize). Default: one resize of the whole
        low-res map to the original size (SAM 2's `postprocess_masks`)."""
        n = self.image_size // 4
        return [(n / original_size[0], original_size[0])], [(n / original_size[1], original_size[1])]

    def mask_windows(self, low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                     fast: bool = False) -> torch.Tensor:
        """(N, 4) int64 `y0, y1, x0, x1` per mask: the original-size pixels that the paste (`fast`
        or plain) can set, i.e. those whose interpolation reads a low-res cell above the threshold
        (with a pixel to spare each side); (0, 0, 0, 0) for a mask with no such cell."""
        H, W = original_size
        n = low_res.shape[0]
        full = torch.tensor([[0, H, 0, W]], dtype=torch.int64, device=low_res.device).expand(n, 4)
        if self.mask_threshold != 0:  # the sign argument holds for 0 (both SAM families' threshold)
            return full.clone()
        active = low_res[:, 0] > self.mask_threshold
        h, w = active.shape[-2:]
        if fast:  # grid_sample maps output pixel i to low-res coordinate (i + 0.5) * scale - 0.5
            rows = [(input_size[0] * h / (self.image_size * H), H)]
            cols = [(input_size[1] * w / (self.image_size * W), W)]
        else:
            rows, cols = self._upsample_stages(input_size, original_size)
        # (N, n) flags are small: the reach is computed on the host, in float64 (which not every
        # accelerator has).
        flags = active.view(torch.uint8)  # amax over bytes: several times faster than any() on a CPU
        y0, y1 = _reach(flags.amax(dim=2).bool().cpu(), rows)
        x0, x1 = _reach(flags.amax(dim=1).bool().cpu(), cols)
        empty = (y1 <= y0) | (x1 <= x0)
        windows = torch.stack([y0, y1, x0, x1], dim=1)
        return torch.where(empty[:, None], torch.zeros_like(windows), windows).to(low_res.device)

    def _fast_grid(self, input_size: Tuple[int, int], original_size: Tuple[int, int],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fast paste's sampling points: output pixel centres mapped into the padded input
        frame, as grid_sample's [-1, 1] coordinates over the low-res map (align_corners=False),
        (H,) for the rows and (W,) for the columns."""
        H, W = original_size
        S = float(self.image_size)
        gy = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) * (input_size[0] / H) * (2.0 / S) - 1.0
        gx = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * (input_size[1] / W) * (2.0 / S) - 1.0
        return gy, gx

    def paste_masks_rle(self, low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                        fast: bool = True, windows: Optional[torch.Tensor] = None) -> RunLengthMasks:
        """The masks of `paste_masks` as `RunLengthMasks`, computed on `low_res`' device.

        The fast paste's runs come straight from the low-res logits (`bilinear_run_lengths`: per
        column and low-res cell, where the interpolated value crosses the threshold), pixel for
        pixel those of `paste_masks(fast=True)` without any (N, H, W) buffer. Otherwise (the plain
        paste, a threshold other than 0, a device without float64) the masks are pasted and then
        encoded. `windows`: those of `mask_windows(..., fast)` when the caller has them.
        """
        if windows is None:
            windows = self.mask_windows(low_res, input_size, original_size, fast=fast)
        if fast and self.mask_threshold == 0 and min(low_res.shape[-2:]) >= 2 and has_float64(low_res.device):
            gy, gx = self._fast_grid(input_size, original_size, low_res.device)
            counts, lengths = bilinear_run_lengths(low_res, windows, gy, gx)
        else:
            masks = self.paste_masks(low_res, input_size, original_size, fast=fast, windows=windows)
            counts, lengths = run_lengths(masks, windows)
        return RunLengthMasks(counts, lengths, original_size)

    def run_lengths_pay_off(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                            original_size: Tuple[int, int], windows: torch.Tensor) -> bool:
        """Whether `paste_masks_rle` is the cheaper way to these masks' run lengths than pasting
        them (see `bilinear_pays_off`); always on accelerators with float64, where it never needs
        (N, H, W)."""
        if low_res.device.type != "cpu":
            return has_float64(low_res.device)
        columns_per_cell = self.image_size / (input_size[1] / original_size[1]) / low_res.shape[-1]
        return bilinear_pays_off(low_res, windows, original_size, columns_per_cell)

    def _paste_windows(self, low_res: torch.Tensor, windows: torch.Tensor, input_size: Tuple[int, int],
                       original_size: Tuple[int, int], out: torch.Tensor) -> None:
        """The fast paste of each mask's window into `out`: grid_sample at the same grid points as
        the whole-image grid (each output pixel depends only on its own grid point)."""
        H, W = original_size
        dev = low_res.device
        gy, gx = self._fast_grid(input_size, original_size, dev)
        heights, widths = (windows[:, 1] - windows[:, 0]).tolist(), (windows[:, 3] - windows[:, 2]).tolist()
        todo = sorted((i for i in range(len(heights)) if heights[i] and widths[i]),
                      key=lambda i: (heights[i], widths[i]))
        start, shared_grids = 0, {}
        while start < len(todo):  # masks of similar windows together, within paste_pixels
            stop, R, C = start + 1, heights[todo[start]], widths[todo[start]]
            own = R * C
            while stop < len(todo):
                r, c = max(R, heights[todo[stop]]), max(C, widths[todo[stop]])
                samples = (stop + 1 - start) * r * c
                own_next = own + heights[todo[stop]] * widths[todo[stop]]
                if samples > self.paste_pixels or samples > 2 * own_next:  # at most twice the windows' pixels
                    break
                stop, R, C, own = stop + 1, r, c, own_next
            idx = torch.tensor(todo[start:stop], device=dev)
            # A window of R x C that holds each mask's own (every pixel in it is a real pixel of
            # the whole-image paste, so the larger window is exact too).
            top = torch.minimum(windows[idx, 0], torch.tensor(H - R, device=dev))
            left = torch.minimum(windows[idx, 2], torch.tensor(W - C, device=dev))
            cols = left[:, None] + torch.arange(C, device=dev)  # (n, C)
            band = max(1, self.paste_pixels // (len(idx) * C))  # rows at a time: one huge window in bands
            shared = bool((top == top[0]).all() and (left == left[0]).all())  # e.g. whole-image windows
            for r0 in range(0, R, band):
                rows = top[:, None] + torch.arange(r0, min(R, r0 + band), device=dev)  # (n, r)
                # Grid points (x, y), copied in place (stacking broadcast views is slow on a CPU);
                # a window shared by all masks of a group gets one grid, reused by later groups.
                key = (int(top[0]) + r0, rows.shape[1], int(left[0]), C) if shared else None
                grid = shared_grids.get(key)
                if grid is None:
                    grid = torch.empty((1 if shared else len(idx), rows.shape[1], C, 2), device=dev)
                    grid[..., 0] = gx[cols[:grid.shape[0]]][:, None, :]
                    grid[..., 1] = gy[rows[:grid.shape[0]]][:, :, None]
                    if shared:
                        shared_grids = {key: grid}
                grid = grid.expand(len(idx), -1, -1, -1)
                logits = F.grid_sample(low_res[idx].float(), grid, mode="bilinear", padding_mode="border",
                                       align_corners=False)
                sampled = logits[:, 0] > self.mask_threshold
                if shared:
                    y, x = int(top[0]) + r0, int(left[0])
                    out[idx, y: y + rows.shape[1], x: x + C] = sampled
                    continue
                for j, (i, y, x) in enumerate(zip(todo[start:stop], top.tolist(), left.tolist())):
                    out[i, y + r0: y + r0 + rows.shape[1], x: x + C] = sampled[j]
            start = stop

    def _paste_plain(self, low_res: torch.Tensor, windows: torch.Tensor, input_size: Tuple[int, int],
                     original_size: Tuple[int, int], out: torch.Tensor, chunk: int) -> None:
        """The package's own upsampling of each mask with a non-empty window, into `out`."""
        frame = max(self.image_size ** 2, original_size[0] * original_size[1])
        step = max(1, min(chunk, self.paste_pixels // frame))
        todo = ((windows[:, 1] > windows[:, 0]) & (windows[:, 3] > windows[:, 2])).nonzero().flatten()
        for idx in todo.split(step):
            logits = self._upsample_logits(low_res[idx].float(), input_size, original_size)
            out[idx] = logits[:, 0] > self.mask_threshold

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


def _reach(active: torch.Tensor, stages: List[Tuple[float, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of `active` (N, n: which low-res cells are above the threshold along one axis),
    the output positions [lo, hi) that bilinear resizes (align_corners=False) by `stages` (scale,
    positions kept) can make positive. Position i reads cells floor(u) and floor(u) + 1 at
    u = (i + 0.5) * scale - 0.5 (clamped at the borders), so it can be positive only when
    lo - 1 <= u < hi + 1 for the active cells lo..hi; one more position is kept each side
    against rounding. Empty rows give lo >= hi."""
    n = active.shape[1]
    pos = torch.arange(n, device=active.device)
    ok = active.any(dim=1)
    lo = torch.where(active, pos, n).amin(dim=1).double()
    hi = torch.where(active, pos, -1).amax(dim=1).double()  # inclusive
    for scale, size in stages:
        lo = (torch.floor((lo - 0.5) / scale - 0.5) - 1).clamp(min=0)
        hi = (torch.ceil((hi + 1.5) / scale - 0.5) + 1).clamp(max=size - 1)
        ok &= hi >= lo  # e.g. cells only in the padding that a crop drops
    zero = torch.zeros_like(lo, dtype=torch.long)
    return torch.where(ok, lo.long(), zero), torch.where(ok, hi.long() + 1, zero)
