"""COCO run-length encoding of boolean masks, computed where the masks are.

`pycocotools.mask.encode` needs the masks on the host and walks every pixel in C: about 1 ms per
640x480 mask on a CPU core, and a GPU's masks would first be copied to the host whole. Here the run
lengths are found with tensor ops on the masks' own device (column-major, as COCO's RLE wants), only
the counts move to the host, and a vectorised NumPy encoder writes COCO's compressed string. The
bytes are exactly those of `pycocotools.mask.encode` (tests check every kind of shape).

A mask may come with a window (`y0, y1, x0, x1`, see `RegionEncoderBase.paste_masks`) outside which
it is known to be False: then only the columns in its window are read, since in column-major order
every column outside it is part of a run of zeros.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

# Pixels (masks x window columns x height) read at once: bounds the temporary buffers (a few bytes
# per pixel) whatever the image size.
CHUNK_PIXELS = 1 << 25


def run_lengths(masks: torch.Tensor, windows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uncompressed COCO RLE counts of boolean masks (N, H, W), on the masks' device.

    Args:
        masks: (N, H, W) bool.
        windows: optional (N, 4) int `y0, y1, x0, x1` per mask; the mask must be False outside it
            (only columns x0..x1 are read).
    Returns (counts, lengths): all masks' counts concatenated (int64; each mask's start with its
    leading zeros, possibly 0, and sum to H * W), and the number of counts of each mask.
    """
    if masks.ndim != 3:
        raise ValueError(f"Masks to RLE-encode must be (N, H, W), got shape {tuple(masks.shape)}.")
    n, h, w = masks.shape
    dev = masks.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty
    if masks.dtype != torch.bool:
        masks = masks != 0
    x0 = torch.zeros(n, dtype=torch.int64, device=dev)
    x1 = torch.full((n,), w, dtype=torch.int64, device=dev)
    if windows is not None:
        windows = windows.to(device=dev, dtype=torch.int64)
        x0, x1 = windows[:, 2].clamp(0, w), windows[:, 3].clamp(0, w)
        x1 = torch.maximum(x0, x1)
    counts, lengths = [], []
    width = (x1 - x0).tolist()
    start = 0
    while start < n:  # chunks of masks whose columns to read stay under CHUNK_PIXELS
        stop, cols = start, 0
        while stop < n and (stop == start or max(cols, width[stop]) * (stop + 1 - start) * h <= CHUNK_PIXELS):
            cols = max(cols, width[stop])
            stop += 1
        c, l = _chunk_run_lengths(masks[start:stop], x0[start:stop], cols)
        counts.append(c)
        lengths.append(l)
        start = stop
    return torch.cat(counts), torch.cat(lengths)


def _chunk_run_lengths(masks: torch.Tensor, x0: torch.Tensor, cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`run_lengths` of masks that are False outside columns [x0, x0 + cols), `cols` alike for all."""
    n, h, w = masks.shape
    dev = masks.device
    x0 = x0.clamp(max=w - cols)  # a window of `cols` columns that holds the mask's own, in the image
    # Each mask's columns x0..x0+cols, column-major, between two False sentinels: a change between
    # neighbours of the padded sequence is a run boundary.
    length = cols * h
    seq = torch.zeros((n, length + 2), dtype=torch.bool, device=dev)
    body = seq[:, 1:-1].view(n, cols, h)
    if cols == w:
        body.copy_(masks.transpose(1, 2))
    elif cols:
        idx = (x0[:, None] + torch.arange(cols, device=dev))[:, :, None].expand(n, cols, h)
        body.copy_(masks.transpose(1, 2).gather(1, idx))
    which, where = (seq[:, 1:] != seq[:, :-1]).nonzero(as_tuple=True)
    # Boundary j of mask k is at pixel x0 * h + j of the whole column-major mask; one at the very
    # end (H * W) ends the last run and is not a boundary.
    bounds = x0[which] * h + where
    inside = bounds < h * w
    which, bounds = which[inside], bounds[inside]
    per_mask = torch.bincount(which, minlength=n)
    lengths = per_mask + 1
    ends = lengths.cumsum(0) - 1  # where each mask's closing boundary (H * W) goes
    total = int(ends[-1]) + 1
    out = torch.full((total,), h * w, dtype=torch.int64, device=dev)
    is_bound = torch.ones(total, dtype=torch.bool, device=dev)
    is_bound[ends] = False
    out[is_bound] = bounds
    prev = out.roll(1)
    prev[ends - per_mask] = 0  # each mask's first run starts at pixel 0
    return out - prev, lengths


def compress_counts(counts: np.ndarray, lengths: np.ndarray) -> List[bytes]:
    """COCO's compressed RLE strings (as `pycocotools.mask.encode` writes them) of concatenated
    uncompressed counts, `lengths[i]` of them for mask i.

    The format (pycocotools' `rleToString`): from the fourth count on, each count is replaced by
    its difference to the count two before; each value is written as 5-bit groups, least
    significant first, in characters 48 + group, with bit 5 set while more groups follow (LEB128-
    like, sign-aware).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    if lengths.min() < 1 or lengths.sum() != counts.size:
        raise ValueError(f"RLE lengths must be >= 1 and sum to the {counts.size} counts given.")
    starts = np.cumsum(lengths) - lengths
    position = np.arange(counts.size) - np.repeat(starts, lengths)
    values = counts.copy()
    later = np.nonzero(position > 2)[0]
    values[later] -= counts[later - 2]
    groups, active = [], np.ones(counts.size, dtype=bool)
    while True:
        low = values & 0x1F
        values = values >> 5  # arithmetic shift, as on C's signed long
        more = np.where(low & 0x10, values != -1, values != 0)
        groups.append(np.where(active, (low | (more << 5)) + 48, 0).astype(np.uint8))
        active &= more
        if not active.any():
            break
    chars = np.stack(groups, axis=1)  # (counts, groups); 0 where a value has no more characters
    used = chars != 0
    stream = chars[used].tobytes()
    per_mask = np.add.reduceat(used.sum(1), starts)
    bounds = np.concatenate([[0], np.cumsum(per_mask)]).tolist()
    return [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def encode_masks(masks: torch.Tensor, windows: Optional[torch.Tensor] = None, route: str = "auto") -> List[Dict]:
    """COCO compressed RLEs `{"size": [H, W], "counts": bytes}` of boolean masks (N, H, W) on any
    device, equal to `pycocotools.mask.encode` of the same masks in Fortran order.

    Args:
        masks: (N, H, W) bool.
        windows: optional (N, 4) `y0, y1, x0, x1` per mask, outside which it is False.
        route: "tensor" (run lengths by tensor ops on the masks' device, then `compress_counts`),
            "host" (pycocotools' C encoder on each mask's window columns), or "auto": "host" for
            masks on the CPU, where one pass in C reads a mask faster than a chain of tensor ops,
            else "tensor", so that an accelerator's masks never travel to the host whole.
    """
    if masks.ndim != 3:
        raise ValueError(f"Masks to RLE-encode must be (N, H, W), got shape {tuple(masks.shape)}.")
    if route not in ("auto", "tensor", "host"):
        raise ValueError(f"Unknown RLE route {route!r}; choose 'auto', 'tensor' or 'host'.")
    size = [int(masks.shape[1]), int(masks.shape[2])]
    if route == "host" or (route == "auto" and masks.device.type == "cpu"):
        strings = _encode_on_host(masks, windows)
    else:
        counts, lengths = run_lengths(masks, windows)
        strings = compress_counts(counts.cpu().numpy(), lengths.cpu().numpy())
    return [{"size": list(size), "counts": s} for s in strings]


def _column_spans(masks: torch.Tensor, windows: Optional[torch.Tensor]) -> Tuple[List[int], List[int]]:
    """Per mask the columns [a, b) to read: its window's, widened by one column of zeros on each
    side that is inside the image (so the crop starts and ends with a run of zeros unless it
    touches the image's border)."""
    n, _, w = masks.shape
    if windows is None:
        return [0] * n, [w] * n
    x0, x1 = windows[:, 2].tolist(), windows[:, 3].tolist()
    a = [min(max(v - 1, 0), w) for v in x0]
    b = [max(min(v + 1, w), lo) for v, lo in zip(x1, a)]
    return a, b


def _encode_on_host(masks: torch.Tensor, windows: Optional[torch.Tensor]) -> List[bytes]:
    """The "host" route: pycocotools encodes each mask's window columns, and the zeros of the
    columns left out are added to the first and last counts (the only counts they touch; COCO
    strings store the first three counts as they are and later ones as differences, so each of
    the two is re-encoded alone and spliced back)."""
    n, h, w = masks.shape
    masks = masks.cpu()
    if masks.dtype != torch.bool:
        masks = masks != 0
    a, b = _column_spans(masks, windows)
    order = sorted(range(n), key=lambda i: b[i] - a[i])  # similar widths together
    out = [b""] * n
    array = masks.numpy()
    for start in range(0, n, 32):  # pycocotools wants (H, W', K) in Fortran order: (K, W', H) in C order
        group = order[start:start + 32]
        width = max(b[i] - a[i] for i in group)
        offsets = [min(a[i], w - width) for i in group]
        crops = np.empty((len(group), width, h), dtype=bool)  # NumPy: one thread, no per-op start-up
        for j, (i, x) in enumerate(zip(group, offsets)):
            crops[j] = array[i, :, x:x + width].T
        fortran = crops.view(np.uint8).transpose(2, 1, 0)
        for rle, i, x in zip(mask_util.encode(fortran), group, offsets):
            out[i] = _add_zeros(rle["counts"], x * h, (w - x - width) * h)
    return out


def _add_zeros(counts: bytes, before: int, after: int) -> bytes:
    """A compressed RLE string with `before` zeros added to its first count and `after` to its
    last (which must be a run of zeros when `after` > 0)."""
    if not before and not after:
        return counts
    first_end = 0  # the first count's last character: the first without the "more" bit
    while (counts[first_end] - 48) & 0x20:
        first_end += 1
    first = _encode_value(_decode_value(counts[:first_end + 1]) + before)
    if first_end == len(counts) - 1:  # a single count (an empty mask)
        return _encode_value(_decode_value(counts) + before + after)
    last_start = len(counts) - 1  # the last count starts after the previous count's last character
    while (counts[last_start - 1] - 48) & 0x20:
        last_start -= 1
    if not after:
        return first + counts[first_end + 1:]
    return first + counts[first_end + 1:last_start] + _encode_value(_decode_value(counts[last_start:]) + after)


def _decode_value(chars: bytes) -> int:
    """One value of a COCO string (pycocotools' `rleFrString`, before the difference is undone)."""
    x, k = 0, 0
    for c in chars:
        c -= 48
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if not c & 0x20 and c & 0x10:
            x |= -1 << (5 * k)
    return x


def _encode_value(x: int) -> bytes:
    """One value in COCO's string encoding (pycocotools' `rleToString`)."""
    out = bytearray()
    while True:
        c = x & 0x1F
        x >>= 5
        more = x != -1 if c & 0x10 else x != 0
        out.append((c | (0x20 if more else 0)) + 48)
        if not more:
            return bytes(out)
