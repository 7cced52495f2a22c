"""Image pre-processing in numpy, equal to the PyTorch path's.

- `test_resize`: detectron2's test-time ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` (PIL's
  bilinear resize of the uint8 image, as detectron2's `ResizeTransform` does it);
- `sam_input`: SAM's resize of the longest side (torch's antialiased bilinear) + normalise + pad,
  or SAM 2's square resize + normalise;
- `clip_input`: CLIP's squash to its square with the configured mode and antialias + normalise.

torch's `F.interpolate` is separable: each axis is a (out, in) weight matrix (`resize_weights`),
with the antialiased kernels of `_upsample_bilinear2d_aa` / `_upsample_bicubic2d_aa` (a triangle or
Keys' a = -0.5 cubic, widened by the scale when shrinking, normalised per output pixel) and the
plain ones (clamped source index for bilinear, A = -0.75 cubic with clamped taps).
"""
from typing import Dict, Tuple

import numpy as np
from PIL import Image

RESIZE_MODES = ("bilinear", "bicubic")


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_weights(in_size: int, out_size: int, mode: str, antialias: bool) -> np.ndarray:
    """The (out_size, in_size) matrix of torch's `F.interpolate` along one axis
    (align_corners=False, no scale_factor)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"Unknown resize mode {mode!r}; choose one of {RESIZE_MODES}.")
    # Source positions in float32, as torch computes them (it matters at large sizes).
    scale = np.float32(in_size) / np.float32(out_size)
    w = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if antialias:
        half = 1.0 if mode == "bilinear" else 2.0
        support = float(np.float32(half) * scale) if scale >= 1.0 else half
        inv = float(np.float32(1.0) / scale) if scale >= 1.0 else 1.0
        kernel = _triangle if mode == "bilinear" else (lambda x: _keys_cubic(x, -0.5))
        for i in rows:
            center = float(scale * np.float32(i + 0.5))
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = kernel((np.arange(lo, hi) - center + 0.5) * inv)
            total = taps.sum()
            if total != 0.0:
                w[i, lo:hi] = taps / total
        return w
    src = (scale * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)).astype(np.float64)
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        frac = src - i0
        np.add.at(w, (rows, i0), 1.0 - frac)
        np.add.at(w, (rows, i1), frac)
        return w
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    for k in range(-1, 3):
        taps = _keys_cubic(t - k, -0.75)
        np.add.at(w, (rows, np.clip(i0 + k, 0, in_size - 1)), taps)
    return w


def resize_chw(x: np.ndarray, size: Tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """A (C, H, W) float image resized to `size` (h, w) as torch's `F.interpolate` does it."""
    h, w = size
    wy = resize_weights(x.shape[1], h, mode, antialias)
    wx = resize_weights(x.shape[2], w, mode, antialias)
    return np.einsum("oh,chw,pw->cop", wy, x.astype(np.float64), wx, optimize=True)


def shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """detectron2's `ResizeShortestEdge.get_output_shape`."""
    size = short * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_resize(rgb: np.ndarray, rule: Dict) -> np.ndarray:
    """The image the encoders see: `rule` = manifest["test_resize"] (min_size 0 = as it is)."""
    if not rule["min_size"]:
        return rgb
    h, w = rgb.shape[:2]
    newh, neww = shortest_edge_shape(h, w, rule["min_size"], rule["max_size"])
    return np.asarray(Image.fromarray(rgb).resize((neww, newh), Image.BILINEAR))


def longest_side_shape(h: int, w: int, side: int) -> Tuple[int, int]:
    """SAM's `ResizeLongestSide.get_preprocess_shape`, no side below one pixel (as RegionSpot's)."""
    scale = side * 1.0 / max(h, w)
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def _normalise(x: np.ndarray, mean, std) -> np.ndarray:
    return (x - np.asarray(mean, np.float64)[:, None, None]) / np.asarray(std, np.float64)[:, None, None]


def sam_input(rgb: np.ndarray, sam: Dict) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(H, W, 3) uint8 -> ((1, 3, S, S) float32 SAM input, (h, w) of the resized image inside it)."""
    S = sam["image_size"]
    x = rgb.transpose(2, 0, 1).astype(np.float64) * sam.get("value_scale", 1.0)
    if sam["resize"] == "square":
        size = (S, S)
        out = _normalise(resize_chw(x, size, sam["resize_mode"], sam["antialias"]), sam["mean"], sam["std"])
    else:
        size = longest_side_shape(rgb.shape[0], rgb.shape[1], S)
        out = np.zeros((3, S, S), dtype=np.float64)
        out[:, :size[0], :size[1]] = _normalise(resize_chw(x, size, sam["resize_mode"], sam["antialias"]),
                                                sam["mean"], sam["std"])
    return out[None].astype(np.float32), size


def clip_input(rgb: np.ndarray, clip: Dict) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, s, s) float32: the whole image squashed to CLIP's square, normalised."""
    s = clip["input_size"]
    x = resize_chw(rgb.transpose(2, 0, 1).astype(np.float64), (s, s), clip["resize_mode"], clip["antialias"])
    return _normalise(x, clip["mean"], clip["std"])[None].astype(np.float32)


def grid_weights(out_size: int, in_size_used: int, frame: int, low_res: int) -> np.ndarray:
    """(out_size, low_res) bilinear weights of `grid_sample(..., align_corners=False,
    padding_mode="border")` at the output pixel centres mapped into the S-pixel input frame, of
    which the image fills the first `in_size_used` pixels (RegionSpot's fast mask paste)."""
    g = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * np.float32(in_size_used / out_size) \
        * np.float32(2.0 / frame) - np.float32(1.0)
    src = ((g.astype(np.float64) + 1.0) * low_res - 1.0) / 2.0
    src = np.clip(src, 0.0, low_res - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, low_res - 1)
    frac = src - i0
    w = np.zeros((out_size, low_res), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def paste_weights(sam: Dict, fast: bool, input_size: Tuple[int, int], out_size: Tuple[int, int]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(Wy (H, l), Wx (W, l)): full-size mask logits = Wy @ low_res @ Wx.T, as RegionSpot pastes them
    (`RegionEncoderBase.paste_masks`): the fast single interpolation, or the SAM package's own
    (SAM: upsample to S x S, crop the image, resize; SAM 2: one resize)."""
    S, low = sam["image_size"], sam["low_res_size"]
    H, W = out_size
    if fast:
        return grid_weights(H, input_size[0], S, low), grid_weights(W, input_size[1], S, low)
    if sam["family"] == "sam2":
        return resize_weights(low, H, "bilinear", False), resize_weights(low, W, "bilinear", False)
    up = resize_weights(low, S, "bilinear", False)
    wy = resize_weights(input_size[0], H, "bilinear", False) @ up[:input_size[0]]
    wx = resize_weights(input_size[1], W, "bilinear", False) @ up[:input_size[1]]
    return wy, wx


def paste_masks(low_res: np.ndarray, wy: np.ndarray, wx: np.ndarray, threshold: float, chunk: int = 16) -> np.ndarray:
    """(N, 1, l, l) logits -> (N, H, W) bool masks, `chunk` at a time (bounded float buffers)."""
    n = low_res.shape[0]
    out = np.zeros((n, wy.shape[0], wx.shape[0]), dtype=bool)
    wy32, wx32 = wy.astype(np.float32), wx.astype(np.float32)
    for start in range(0, n, chunk):
        part = low_res[start:start + chunk, 0].astype(np.float32)
        out[start:start + chunk] = np.matmul(np.matmul(wy32, part), wx32.T) > threshold
    return out

