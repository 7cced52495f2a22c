"""Masks shared between detections: one full-size mask per box, however many classes it carries."""
from typing import Iterator, List, Optional, Union

import numpy as np
import torch


class IndexedMasks:
    """A (K, H, W) boolean mask tensor stored as U <= K unique masks plus an index per detection.

    Behaves like the tensor for what `Instances` and detectron2's evaluators and `Visualizer` do
    with `pred_masks` (len, indexing, iteration, `.to`, `np.asarray`), without copying a
    full-resolution mask for every (box, class) pair.

    `windows`, when given, are (U, 4) `y0, y1, x0, x1` per unique mask, outside which it is False
    (what `RegionEncoderBase.paste_masks` knows from the low-res logits): RLE encoding then reads
    only the window's columns (`regionspot.mask_rle`).
    """

    def __init__(self, masks: torch.Tensor, index: torch.Tensor, windows: Optional[torch.Tensor] = None):
        assert masks.ndim == 3, masks.shape
        assert windows is None or tuple(windows.shape) == (masks.shape[0], 4), (windows.shape, masks.shape)
        self.masks = masks
        self.index = index.long()
        self.windows = windows

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, item) -> Union[torch.Tensor, "IndexedMasks"]:
        if isinstance(item, int):
            return self.masks[self.index[item]]
        return IndexedMasks(self.masks, self.index[item], self.windows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.index.tolist():
            yield self.masks[i]

    def to(self, *args, **kwargs) -> "IndexedMasks":
        masks = self.masks.to(*args, **kwargs)
        windows = None if self.windows is None else self.windows.to(masks.device)
        return IndexedMasks(masks, self.index.to(masks.device), windows)

    @property
    def device(self) -> torch.device:
        return self.masks.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.masks.shape[1:]))

    @property
    def tensor(self) -> torch.Tensor:
        """The (K, H, W) tensor, materialised (copies)."""
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
            offsets += m.masks.shape[0]
        windowed = all(m.windows is not None for m in items)
        windows = torch.cat([m.windows for m in items]) if windowed and items else None
        return IndexedMasks(torch.cat(masks), torch.cat(index), windows)

    def __repr__(self) -> str:
        return f"IndexedMasks(num={len(self)}, unique={self.masks.shape[0]}, size={tuple(self.masks.shape[1:])})"
