"""Masks of one image's detections, held compactly: as run lengths, and shared between detections."""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .mask_rle import compress_counts, decode_run_lengths


def _is_scalar(item) -> bool:
    """An index that picks one mask, as it does for a tensor: a Python, NumPy or 0-d tensor integer."""
    return (isinstance(item, (int, np.integer)) and not isinstance(item, bool)) or (
        isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point() and item.dtype != torch.bool)


class RunLengthMasks:
    """N boolean (H, W) masks as COCO run lengths: per mask, counts of alternating runs of False
    and True pixels in column-major order (the first run is False, possibly empty), as
    `regionspot.mask_rle.run_lengths` gives them.

    What the evaluation's mask paste produces (`RegionEncoderBase.paste_masks_rle`): for masks of
    objects, a few kilobytes per image where (N, H, W) booleans take tens of megabytes (8 bytes a
    run: noise-like masks can take more), and the evaluator's COCO
    strings come from the counts without touching a pixel. Indexing a single mask, `tensor`,
    `np.asarray` and iteration give dense masks, for `Visualizer` and other pixel consumers.
    """

    def __init__(self, counts: torch.Tensor, lengths: torch.Tensor, size: Tuple[int, int]):
        if counts.ndim != 1 or lengths.ndim != 1:
            raise ValueError(f"RunLengthMasks wants 1-D counts and lengths, got shapes {tuple(counts.shape)} "
                             f"and {tuple(lengths.shape)}.")
        self.counts = counts.long()
        self.lengths = lengths.long().to(counts.device)
        self.size = (int(size[0]), int(size[1]))
        self._starts: Optional[torch.Tensor] = None

    @property
    def starts(self) -> torch.Tensor:
        """Where each mask's counts begin in `counts`."""
        if self._starts is None:
            self._starts = self.lengths.cumsum(0) - self.lengths
        return self._starts

    def __len__(self) -> int:
        return self.lengths.numel()

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.size))

    def select(self, index: torch.Tensor) -> "RunLengthMasks":
        """The masks at `index` (1-D integer or boolean), in that order."""
        index = torch.as_tensor(index, device=self.lengths.device)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long().flatten()
        lengths = self.lengths[index]
        starts = self.starts[index]
        within = torch.arange(int(lengths.sum()), device=self.counts.device) - torch.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths)
        return RunLengthMasks(self.counts[torch.repeat_interleave(starts, lengths) + within], lengths, self.size)

    def __getitem__(self, item) -> Union[torch.Tensor, "RunLengthMasks"]:
        if _is_scalar(item):
            i = int(item)
            if not -len(self) <= i < len(self):
                raise IndexError(f"mask {i} of {len(self)}")
            return self.select(torch.tensor([i % len(self)]))._dense()[0]
        if isinstance(item, slice):
            return self.select(torch.arange(len(self))[item])
        return self.select(torch.as_tensor(item))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def _dense(self) -> torch.Tensor:
        return decode_run_lengths(self.counts, self.lengths, self.size)

    @property
    def tensor(self) -> torch.Tensor:
        """The (N, H, W) boolean masks (decoded; memory grows with N x H x W)."""
        return self._dense()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self._dense().cpu().numpy()
        return arr if dtype is None else arr.astype(dtype)

    def to(self, *args, **kwargs) -> "RunLengthMasks":
        counts = self.counts.to(*args, **kwargs)
        return RunLengthMasks(counts, self.lengths.to(counts.device), self.size)

    def areas(self) -> torch.Tensor:
        """Pixels in each mask: the sum of its odd (True) runs."""
        position = torch.arange(len(self.counts), device=self.counts.device) - torch.repeat_interleave(
            self.starts, self.lengths)
        owner = torch.repeat_interleave(torch.arange(len(self), device=self.counts.device), self.lengths)
        return torch.zeros(len(self), dtype=torch.long, device=self.counts.device).index_add_(
            0, owner, self.counts * (position % 2))

    def to_coco(self) -> List[Dict]:
        """COCO compressed RLEs `{"size": [H, W], "counts": bytes}`, equal to
        `pycocotools.mask.encode` of the dense masks."""
        strings = compress_counts(self.counts.cpu().numpy(), self.lengths.cpu().numpy())
        return [{"size": list(self.size), "counts": s} for s in strings]

    @staticmethod
    def cat(items: Sequence["RunLengthMasks"]) -> "RunLengthMasks":
        if not items:
            raise ValueError("RunLengthMasks.cat needs at least one item.")
        sizes = {m.size for m in items}
        if len(sizes) != 1:
            raise ValueError(f"RunLengthMasks.cat of masks of different sizes: {sorted(sizes)}.")
        return RunLengthMasks(torch.cat([m.counts for m in items]), torch.cat([m.lengths for m in items]),
                              items[0].size)

    def __repr__(self) -> str:
        return f"RunLengthMasks(num={len(self)}, size={self.size}, counts={self.counts.numel()})"


UniqueMasks = Union[torch.Tensor, RunLengthMasks]


class IndexedMasks:
    """A (K, H, W) boolean mask tensor stored as U <= K unique masks plus an index per detection.

    Behaves like the tensor for what `Instances` and detectron2's evaluators and `Visualizer` do
    with `pred_masks` (len, indexing, iteration, `.to`, `np.asarray`), without copying a
    full-resolution mask for every (box, class) pair. The unique masks are a (U, H, W) tensor or
    `RunLengthMasks`.

    `windows`, when given with a tensor, are (U, 4) `y0, y1, x0, x1` per unique mask, outside which
    it is False (what `RegionEncoderBase.paste_masks` knows from the low-res logits): RLE encoding
    then reads only the window's columns (`regionspot.mask_rle`).
    """

    def __init__(self, masks: UniqueMasks, index: torch.Tensor, windows: Optional[torch.Tensor] = None):
        assert isinstance(masks, RunLengthMasks) or masks.ndim == 3, masks.shape
        assert windows is None or tuple(windows.shape) == (len(masks), 4), (windows.shape, masks.shape)
        self.masks = masks
        self.index = index.long()
        self.windows = windows

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, item) -> Union[torch.Tensor, "IndexedMasks"]:
        if _is_scalar(item):
            return self.masks[int(self.index[int(item)])]
        return IndexedMasks(self.masks, self.index[item], self.windows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.index.tolist():
            yield self.masks[i]

    def to(self, *args, **kwargs) -> "IndexedMasks":
        masks = self.masks.to(*args, **kwargs)
        windows = None if self.windows is None else self.windows.to(masks.device)
        return IndexedMasks(masks, self.index.to(masks.device), windows)

    def cpu(self) -> "IndexedMasks":
        return self.to("cpu")

    def numpy(self) -> np.ndarray:
        return np.asarray(self)

    @property
    def device(self) -> torch.device:
        return self.masks.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.masks.shape[1:]))

    @property
    def tensor(self) -> torch.Tensor:
        """The (K, H, W) tensor, materialised (copies)."""
        if isinstance(self.masks, RunLengthMasks):
            return self.masks.select(self.index).tensor
        return self.masks[self.index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.tensor.cpu().numpy()
        return arr if dtype is None else arr.astype(dtype)

    @staticmethod
    def cat(items: List["IndexedMasks"]) -> "IndexedMasks":
        offsets, masks, index = 0, [], []
        for m in items:
            masks.append(m.masks)
            index.append(m.index + offsets)
            offsets += len(m.masks)
        if all(isinstance(m, RunLengthMasks) for m in masks):
            return IndexedMasks(RunLengthMasks.cat(masks), torch.cat(index))
        masks = [m.tensor if isinstance(m, RunLengthMasks) else m for m in masks]
        windowed = all(m.windows is not None for m in items)
        windows = torch.cat([m.windows for m in items]) if windowed and items else None
        return IndexedMasks(torch.cat(masks), torch.cat(index), windows)

    def __repr__(self) -> str:
        return f"IndexedMasks(num={len(self)}, unique={len(self.masks)}, size={tuple(self.masks.shape[1:])})"
