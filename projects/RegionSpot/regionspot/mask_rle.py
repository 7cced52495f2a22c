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
import functools
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

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
    changes = seq[:, 1:] != seq[:, :-1]
    if dev.type == "cpu":  # NumPy finds the sparse changes several times faster than torch on a CPU
        flat = torch.from_numpy(np.flatnonzero(changes.numpy()))
        which, where = flat // changes.shape[1], flat % changes.shape[1]
    else:
        which, where = changes.nonzero(as_tuple=True)
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


# --------------------------------------------------------------------------------------------------
# Run lengths of a thresholded bilinear upsampling, computed from the low-resolution map.
#
# The fast paste (`RegionEncoderBase.paste_masks(fast=True)`) is `grid_sample(low_res, grid) > 0`
# (bilinear, align_corners=False, border padding) on a separable grid: output row i samples low-res
# row coordinate u_i, column j samples v_j. Along one output column, between two neighbouring cell
# rows k and k + 1 the sampled value is linear in u, so inside each cell interval it changes sign at
# most once, where the line crosses zero. The run lengths of a column then follow from one value per
# (column, cell interval) instead of one per pixel: about 10x less work for a 64-cell SAM map on a
# 640x480 image, and no (N, H, W) masks at all.
#
# Exactness: the analytic value (float32 interpolation) and grid_sample's float32 value differ by
# rounding only (relative 1e-7 on the values, about 1e-7 of the map's side on the coordinates, also
# where a coordinate falls on a cell boundary and grid_sample may read the neighbouring cell with a
# rounding-size weight): far below `_MARGIN` times the mask's largest magnitude, and below
# `_MARGIN_FLOOR` where values are subnormal (there rounding is absolute, about 1e-45). Every pixel
# whose analytic value is that close to zero is sampled by grid_sample itself, so the runs are those
# of the paste, pixel for pixel.
_MARGIN = 1e-3
_MARGIN_FLOOR = 1e-30
# Elements evaluated at once: (masks x cell intervals x columns) of the analytic pass, window columns
# in bands where one window alone is larger; pixels sampled exactly per grid_sample. Bounds the
# temporaries at any image size.
BILINEAR_CHUNK = 1 << 20


@functools.lru_cache(maxsize=None)
def has_float64(device: torch.device) -> bool:
    """Whether tensors of `device` can be float64 (`bilinear_run_lengths` needs it; MPS has none)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
    except (RuntimeError, TypeError):
        return False
    return True


def _cell_axis(grid: torch.Tensor, cells: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid_sample's low-res coordinate of each grid value (float64, clamped as border padding
    does), the cell pair (k, k + 1) it falls in (k <= cells - 2), and its offset from cell k."""
    u = (((grid.double() + 1) * cells - 1) / 2).clamp(0, cells - 1)
    k = torch.floor(u).long().clamp(max=cells - 2)
    return u, k, u - k


def _size_groups(rows: List[int], cols: List[int], budget: int, slack: float = 2.0) -> List[List[int]]:
    """Indices with a non-empty rows x cols, sorted by size and grouped so that a group padded to its
    largest rows and cols holds at most `budget` elements and at most `slack` times its own."""
    todo = sorted((i for i in range(len(rows)) if rows[i] > 0 and cols[i] > 0), key=lambda i: (cols[i], rows[i]))
    groups, start = [], 0
    while start < len(todo):
        stop, r, c = start + 1, rows[todo[start]], cols[todo[start]]
        own = r * c
        while stop < len(todo):
            r2, c2 = max(r, rows[todo[stop]]), max(c, cols[todo[stop]])
            own2 = own + rows[todo[stop]] * cols[todo[stop]]
            padded = (stop + 1 - start) * r2 * c2
            if padded > budget or padded > slack * own2:
                break
            stop, r, c, own = stop + 1, r2, c2, own2
        groups.append(todo[start:stop])
        start = stop
    return groups


def bilinear_run_lengths(low_res: torch.Tensor, windows: torch.Tensor, grid_y: torch.Tensor,
                         grid_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`run_lengths` of `grid_sample(low_res, grid) > 0` (bilinear, align_corners=False, border
    padding) on the separable grid `grid_y` x `grid_x`, without sampling every pixel.

    Args:
        low_res: (N, 1, h, w) logits, h and w >= 2.
        windows: (N, 4) `y0, y1, x0, x1` per mask, outside which the mask is known to be False
            (`RegionEncoderBase.mask_windows`).
        grid_y, grid_x: (H,) and (W,) float32 grid_sample coordinates of the output rows, columns.
    Returns (counts, lengths) as `run_lengths` gives them for the (N, H, W) masks.
    """
    n_masks, _, h, w = low_res.shape
    if h < 2 or w < 2:
        raise ValueError(f"bilinear_run_lengths needs a low-res map of at least 2x2 cells, got {h}x{w}.")
    H, W = grid_y.numel(), grid_x.numel()
    dev = low_res.device
    u_y, k_y, _ = _cell_axis(grid_y, h)
    _, k_x, t_x = _cell_axis(grid_x, w)
    cell_ids = torch.arange(h - 1, device=dev)
    axis = {"u_y": u_y, "t_y": (u_y - k_y).float(), "k_x": k_x, "t_x": t_x.float(),
            "start": torch.searchsorted(k_y, cell_ids),  # output rows of cell interval k: [start, stop)
            "stop": torch.searchsorted(k_y, cell_ids, right=True), "H": H, "W": W, "h": h, "w": w,
            "last": int(k_y[-1]), "regular": _regular_rows(u_y)}
    logits = low_res[:, 0].float()
    # Per mask, how far from zero a value must be for its sign to be sure (see _MARGIN).
    if n_masks:
        flat = logits.flatten(1)  # amax and amin: several times faster than aminmax(dim=1) on a CPU
        margin = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)) * _MARGIN
    else:
        margin = logits.new_zeros(0)
    finite = bool(torch.isfinite(margin).all())  # NaN and inf reach the extremes
    if not finite:  # those pixels are sampled exactly; the margin comes from the finite values
        margin = torch.nan_to_num(logits.abs(), nan=0.0, posinf=0.0).flatten(1).amax(dim=1) * _MARGIN
    margin = margin.clamp(min=_MARGIN_FLOOR)
    y0, y1, x0, x1 = windows.to(dev).long().unbind(1)
    live = (y1 > y0) & (x1 > x0)
    first = torch.where(live, k_y[y0.clamp(0, H - 1)], 0)
    n_cells = torch.where(live, k_y[(y1 - 1).clamp(0, H - 1)] - first + 1, 0)
    n_cols = (x1 - x0).clamp(min=0)
    # Columns are independent: a window of more than BILINEAR_CHUNK (cell interval, column) pairs goes
    # in bands of columns, each a piece of its own.
    pieces, piece_x0, piece_cols = torch.arange(n_masks, device=dev), x0, n_cols
    split = n_masks > 0 and int((n_cells * n_cols).max()) > BILINEAR_CHUNK
    if split:
        piece_mask, starts, widths = [], [], []
        for i, (cells, x, cols) in enumerate(zip(n_cells.tolist(), x0.tolist(), n_cols.tolist())):
            band = max(1, BILINEAR_CHUNK // max(1, cells))
            for b in range(0, cols, band):
                piece_mask.append(i), starts.append(x + b), widths.append(min(band, cols - b))
        pieces, piece_x0, piece_cols = (torch.tensor(v, dtype=torch.long, device=dev)
                                        for v in (piece_mask, starts, widths))
    keys, sparse = [], []
    for group in _size_groups(n_cells[pieces].tolist(), piece_cols.tolist(), BILINEAR_CHUNK):
        p = torch.tensor(group, device=dev)
        idx = pieces[p]
        keys.append(_group_boundaries(logits, margin[idx], finite, idx, first[idx], piece_x0[p], piece_cols[p],
                                      int(n_cells[idx].max()), int(piece_cols[p].max()), axis, sparse, split))
        if sum(len(part[0]) for part in sparse) >= BILINEAR_CHUNK:
            keys += _crossings(low_res, grid_y, grid_x, axis, sparse)
            sparse.clear()
    if sparse:
        keys += _crossings(low_res, grid_y, grid_x, axis, sparse)
    return _counts_from_boundaries(torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=dev),
                                   n_masks, H * W)


def bilinear_pays_off(low_res: torch.Tensor, windows: torch.Tensor, size: Tuple[int, int],
                      columns_per_cell: float) -> bool:
    """Whether `bilinear_run_lengths` is expected to be cheaper on a CPU than pasting the masks
    (within their windows) and encoding them. Its cost grows with the (column, cell interval)
    pairs and the zero crossings; the paste's with the masks' pixels. Crossings are expected where
    vertically neighbouring cells differ in sign, one per output column over the cell column.
    Smooth masks (a trained SAM's) pay off; noise (random weights) does not. The constants are
    nanoseconds measured with tools/benchmark.py on a 2-core CPU."""
    if low_res.shape[0] == 0:
        return True
    y0, y1, x0, x1 = windows.long().unbind(1)
    window_pixels = float(((y1 - y0) * (x1 - x0)).clamp(min=0).sum())
    pairs = window_pixels * low_res.shape[-2] / max(1, size[0]) * 1.5  # cell intervals per row, padded
    positive = low_res[:, 0] > 0
    crossings = float(torch.count_nonzero(positive[:, 1:] ^ positive[:, :-1])) * columns_per_cell
    runs = 14 * pairs + 250 * crossings
    paste = 0.7 * low_res.shape[0] * size[0] * size[1] + 4 * window_pixels
    return runs < paste


def _group_boundaries(logits, margin, finite, idx, first, x0, n_cols, Q, C, axis, sparse, split) -> torch.Tensor:
    """Boundary keys (mask * (H*W + 1) + column-major pixel) of a group of masks (columns x0 to
    x0 + n_cols of mask idx each) where a column's sign changes between cell intervals; into `sparse`
    the (mask, column, interval) triples whose interval holds a crossing or a value near zero.

    Padding to C columns adds columns outside a piece. Without `split` they are its mask's own
    columns outside its window, False like the paste and found consistently; with `split` another
    piece of the same mask may hold them, so only the piece's own columns count."""
    dev = logits.device
    H, W, h = axis["H"], axis["W"], axis["h"]
    n = len(idx)
    # Q intervals and C columns from here hold each mask's window, and no interval below the image's last.
    q0 = first.clamp(max=min(h - 1, axis["last"] + 1) - Q)
    cols = x0.clamp(max=W - C)[:, None] + torch.arange(C, device=dev)          # (n, C)
    own = ((cols >= x0[:, None]) & (cols < (x0 + n_cols)[:, None]))[:, None] if split else None  # (n, 1, C)
    cells = q0[:, None] + torch.arange(Q + 1, device=dev)                       # (n, Q + 1) cell rows
    slab = logits[idx[:, None], cells]                                          # (n, Q + 1, w)
    kx = axis["k_x"][cols][:, None, :].expand(-1, Q + 1, -1)
    value = torch.lerp(slab.gather(2, kx), slab.gather(2, kx + 1), axis["t_x"][cols][:, None, :])  # (n, Q + 1, C)
    a0 = value[:, :-1]
    slope = value[:, 1:] - a0                                                   # (n, Q, C) per interval
    interval = q0[:, None] + torch.arange(Q, device=dev)                        # (n, Q)
    start, stop = axis["start"][interval], axis["stop"][interval]
    filled = bool((stop > start).all())  # else some intervals hold no row (an image smaller than the map)
    t_y = axis["t_y"]
    v_first = torch.addcmul(a0, t_y[start.clamp(max=H - 1)][:, :, None], slope)
    v_last = torch.addcmul(a0, t_y[(stop - 1).clamp(min=0)][:, :, None], slope)
    s_first, s_last = v_first > 0, v_last > 0
    if filled:
        s_before = torch.cat([torch.zeros_like(s_last[:, :1]), s_last[:, :-1]], dim=1)
        tail = torch.full((n,), Q - 1, dtype=torch.long, device=dev)
    else:  # the sign before an interval is the last sign of the previous interval that holds rows
        has_rows = stop > start
        last_filled = torch.where(has_rows, torch.arange(Q, device=dev), -1).cummax(dim=1).values
        carried = torch.cat([torch.zeros_like(s_last[:, :1]), s_last], dim=1)  # index 0: before the window
        before = torch.cat([torch.zeros_like(last_filled[:, :1]), last_filled[:, :-1] + 1], dim=1)
        s_before = carried.gather(1, before[:, :, None].expand(-1, -1, C))
        rows3 = has_rows[:, :, None]
        s_first, s_last = s_first & rows3, s_last & rows3
        s_before &= rows3
        tail = last_filled[:, -1]
    enters = s_first != s_before
    crosses = s_first != s_last
    m3 = margin[:, None, None]
    unsure = crosses | (v_first.abs() <= m3) | (v_last.abs() <= m3)
    if not finite:
        unsure |= ~torch.isfinite(v_first + v_last)
    if split:
        enters &= own
        unsure &= own
    if not filled:
        unsure &= rows3
    col_base = cols * H
    base = idx * (H * W + 1)
    m, q, j = _nonzero3(enters)
    out = [base[m] + col_base[m, j] + start[m, q]]
    # A column still positive after its last interval that holds rows ends there.
    ends = s_last.gather(1, tail.clamp(min=0)[:, None, None].expand(-1, 1, C))[:, 0] & (tail >= 0)[:, None]
    if split:
        ends &= own[:, 0]
    m, j = ends.nonzero(as_tuple=True)
    out.append(base[m] + col_base[m, j] + stop[m, tail[m]])
    flat = unsure.flatten().nonzero().flatten()
    m, q, j = flat // (Q * C), (flat // C) % Q, flat % C
    sparse.append((idx[m], cols[m, j], interval[m, q], a0.flatten()[flat], slope.flatten()[flat], margin[m],
                   s_first.flatten()[flat], crosses.flatten()[flat]))
    return torch.cat(out)


def _nonzero3(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (i, j, k) of the True elements of a 3-D tensor, through one flat nonzero."""
    flat = x.flatten().nonzero().flatten()
    b, c = x.shape[1], x.shape[2]
    return flat // (b * c), (flat // c) % b, flat % c


def _regular_rows(u: torch.Tensor) -> torch.Tensor:
    """Per output row r, whether the rows beside the pair (r, r + 1) are at least half the pair's
    spacing away from it (so a line through the pair is further from zero there). False where border
    padding clamps several rows to one coordinate."""
    gap = torch.cat([u.new_full((1,), float("inf")), u.diff(), u.new_full((2,), float("inf"))])  # gap[r] = u[r] - u[r-1]
    return (gap[:-2] >= 0.5 * gap[1:-1]) & (gap[2:] >= 0.5 * gap[1:-1])


def _first_row_after(u: torch.Tensor, value: torch.Tensor, strict: torch.Tensor) -> torch.Tensor:
    """Per query, the first output row whose coordinate `u` (non-decreasing) exceeds `value`
    (`strict`) or reaches it (else)."""
    value = value.contiguous()
    above = torch.searchsorted(u, value, right=True)
    # Only where a row sits exactly on the value do the two differ: search those again.
    tie = ~strict & (above > 0) & (u[(above - 1).clamp(min=0)] == value)
    if bool(tie.any()):
        above[tie] = torch.searchsorted(u, value[tie].contiguous())
    return above


def _crossings(low_res, grid_y, grid_x, axis, sparse) -> List[torch.Tensor]:
    """Boundary keys inside the intervals where a column crosses zero, and the toggles of pixels
    whose value is within the margin of zero (sampled exactly by grid_sample)."""
    dev = low_res.device
    u_y, row_start, row_stop, H, W, h = (axis[k] for k in ("u_y", "start", "stop", "H", "W", "h"))
    mask, col, interval, a0, slope, margin, s_first, crosses = (torch.cat(p) for p in zip(*sparse))
    a0, slope, margin, k = a0.double(), slope.double(), margin.double(), interval.double()
    start, stop = row_start[interval], row_stop[interval]
    finite = torch.isfinite(a0) & torch.isfinite(slope) & (slope != 0)
    d = torch.where(finite, slope, torch.ones_like(slope))
    zero_at = (k - torch.where(finite, a0, torch.zeros_like(a0)) / d).clamp(-1, h)  # u where the line is 0
    # The first row whose sign differs from the interval's first row: rising, the first above zero;
    # falling, the first at or below it.
    first_other = _first_row_after(u_y, zero_at, slope > 0)
    first_other = torch.minimum(torch.maximum(first_other, start + 1), (stop - 1).clamp(min=0))
    base = mask * (H * W + 1) + col * H
    keys = [(base + first_other)[crosses]]
    sign = (mask, col, s_first, crosses, first_other)
    # Rows whose analytic value may be within the margin of zero. At a crossing whose value changes
    # by more than twice the margin from one row to the next, only the two rows around it can be,
    # provided the rows beyond them are at least half that step further away (not where border
    # padding clamps several rows to one coordinate); elsewhere (an end near zero, a flat crossing,
    # a value not finite, clamped rows) the rows within margin / slope.
    before = (first_other - 1).clamp(min=0)
    step = u_y[first_other.clamp(max=H - 1)] - u_y[before]
    steep = crosses & finite & axis["regular"][before] & (step * d.abs() > 2 * margin)
    which, rows = [], []
    for row in (before, first_other):
        near = steep & ((a0 + (u_y[row.clamp(max=H - 1)] - k) * d).abs() <= margin)
        which.append(near.nonzero().flatten()), rows.append(row[near])
    gi = (~steep).nonzero().flatten()
    if not len(gi):
        return keys + _toggles(low_res, grid_y, grid_x, H, W, sign, torch.cat(which), torch.cat(rows))
    half = torch.where(finite[gi], margin[gi], torch.zeros_like(margin[gi])) / d[gi].abs()
    lo = torch.maximum(_first_row_after(u_y, zero_at[gi] - half, torch.zeros_like(gi, dtype=torch.bool)), start[gi])
    hi = torch.minimum(_first_row_after(u_y, zero_at[gi] + half, torch.ones_like(gi, dtype=torch.bool)), stop[gi])
    lo = torch.where(finite[gi], lo, start[gi])
    count = (torch.where(finite[gi], hi, stop[gi]) - lo).clamp(min=0)
    for s, e in _slices(count, BILINEAR_CHUNK):  # at most about BILINEAR_CHUNK rows at a time
        c = count[s:e]
        owner = gi[s:e].repeat_interleave(c)
        at = lo[s:e].repeat_interleave(c) + torch.arange(int(c.sum()), device=dev) - (c.cumsum(0) - c).repeat_interleave(c)
        value = a0[owner] + (u_y[at] - k[owner]) * slope[owner]
        near = (value.abs() <= margin[owner]) | ~finite[owner]
        which.append(owner[near]), rows.append(at[near])
        if sum(len(w) for w in which) >= BILINEAR_CHUNK:
            keys += _toggles(low_res, grid_y, grid_x, H, W, sign, torch.cat(which), torch.cat(rows))
            which, rows = [], []
    if which:
        keys += _toggles(low_res, grid_y, grid_x, H, W, sign, torch.cat(which), torch.cat(rows))
    return keys


def _slices(count: torch.Tensor, budget: int) -> List[Tuple[int, int]]:
    """Consecutive ranges [s, e) of `count` whose sums are at most `budget` plus one element."""
    ends = count.cumsum(0)
    total = int(ends[-1]) if len(ends) else 0
    if total <= budget:
        return [(0, len(count))] if len(count) else []
    cuts = torch.searchsorted(ends, torch.arange(budget, total, budget, device=ends.device), right=True).tolist()
    bounds = [0] + cuts + [len(count)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def _toggles(low_res, grid_y, grid_x, H, W, sign, which, rows) -> List[torch.Tensor]:
    """Pairs of boundary keys that toggle the pixels (entry `which`, row `rows`) whose sign
    grid_sample gives otherwise than the boundaries found so far. One grid holds every mask's pixels,
    padded to the most any mask has, where that fits in BILINEAR_CHUNK; otherwise masks with similar
    numbers of pixels are sampled together, so that a grid holds at most about twice its pixels."""
    mask, col, s_first, crosses, first_other = sign
    if not len(which):
        return []
    dev = low_res.device
    n_masks = low_res.shape[0]
    analytic = s_first[which] ^ (crosses[which] & (rows >= first_other[which]))
    pm, pc = mask[which], col[which]
    per_mask = torch.bincount(pm, minlength=n_masks)
    if n_masks * int(per_mask.max()) <= BILINEAR_CHUNK:  # the usual case: one grid over all masks
        groups, members = [None], [torch.arange(n_masks, device=dev)]
        row_of = members[0]
    else:
        present = per_mask.nonzero().flatten()
        groups = _size_groups(per_mask[present].tolist(), [1] * len(present), BILINEAR_CHUNK)
        group_of, row_of = torch.zeros_like(per_mask), torch.zeros_like(per_mask)
        members = []
        for g, group in enumerate(groups):
            ids = present[torch.tensor(sorted(group), device=dev)]
            group_of[ids], row_of[ids] = g, torch.arange(len(ids), device=dev)
            members.append(ids)
    if len(groups) == 1:  # masks in their own order
        order, offset = torch.argsort(pm, stable=True), per_mask.cumsum(0) - per_mask
    else:  # by group, then by mask
        order = torch.argsort(group_of[pm] * n_masks + pm, stable=True)
        ranked = torch.argsort(group_of * n_masks + torch.arange(n_masks, device=dev))
        offset = torch.empty_like(per_mask)
        offset[ranked] = per_mask[ranked].cumsum(0) - per_mask[ranked]
    pm, pc, rows, analytic = pm[order], pc[order], rows[order], analytic[order]
    slot = torch.arange(len(pm), device=dev) - offset[pm]
    in_group = [len(pm)] if len(groups) == 1 else torch.bincount(group_of[pm], minlength=len(groups)).tolist()
    wrong, s = [], 0
    for ids, n in zip(members, in_group):
        gm, gs, e = row_of[pm[s:s + n]], slot[s:s + n], s + n
        grid = torch.zeros((len(ids), 1, int(per_mask[ids].max()), 2), device=dev)
        grid[gm, 0, gs, 0] = grid_x[pc[s:e]]
        grid[gm, 0, gs, 1] = grid_y[rows[s:e]]
        source = low_res if len(ids) == n_masks else low_res[ids]
        sampled = F.grid_sample(source.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        wrong.append((sampled[gm, 0, 0, gs] > 0) != analytic[s:e])
        s = e
    wrong = torch.cat(wrong)
    if not bool(wrong.any()):
        return []
    flip = pm[wrong] * (H * W + 1) + pc[wrong] * H + rows[wrong]
    return [flip, flip + 1]  # a pixel toggled: a boundary before and after it (pairs cancel below)


def _counts_from_boundaries(keys: torch.Tensor, n_masks: int, area: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(counts, lengths) from boundary keys `mask * (area + 1) + pixel`; a key present an even
    number of times cancels (a run that continues), one at `area` closes the last run."""
    dev = keys.device
    keys, times = torch.unique_consecutive(torch.sort(keys).values, return_counts=True)
    keys = keys[times % 2 == 1]
    mask, pixel = keys // (area + 1), keys % (area + 1)
    inside = pixel < area
    mask, pixel = mask[inside], pixel[inside]
    per_mask = torch.bincount(mask, minlength=n_masks)
    lengths = per_mask + 1
    if not n_masks:
        return lengths.new_zeros(0), lengths
    ends = lengths.cumsum(0) - 1  # each mask's closing boundary (area) goes here
    out = torch.full((int(ends[-1]) + 1,), area, dtype=torch.int64, device=dev)
    is_boundary = torch.ones(len(out), dtype=torch.bool, device=dev)
    is_boundary[ends] = False
    out[is_boundary] = pixel
    previous = out.roll(1)
    previous[ends - per_mask] = 0  # each mask's first run starts at pixel 0
    return out - previous, lengths


def decode_run_lengths(counts: torch.Tensor, lengths: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Boolean (N, H, W) masks from `run_lengths`' counts (the inverse of `run_lengths`)."""
    n, (h, w) = len(lengths), size
    if n == 0:
        return torch.zeros((0, h, w), dtype=torch.bool, device=counts.device)
    starts = lengths.cumsum(0) - lengths
    position = torch.arange(len(counts), device=counts.device) - torch.repeat_interleave(starts, lengths)
    values = torch.repeat_interleave((position % 2 == 1), counts)
    return values.view(n, w, h).transpose(1, 2)
