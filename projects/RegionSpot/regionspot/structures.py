"""Masks shared between detections: one full-size mask per box, however many classes it carries."""
from typing import Iterator, List, Union

import numpy as np
import torch


class IndexedMasks:
    """A (K, H, W) boolean mask tensor stored as U <= K unique masks plus an index per detection.

    Behaves like the tensor for what `Instances` and detectron2's evaluators and `Visualizer` do
    with `pred_masks` (len, indexing, iteration, `.to`, `np.asarray`), without copying a
    full-resolution mask for every (box, class) pair.
    """

    def __init__(self, masks: torch.Tensor, index: torch.Tensor):
        assert masks.ndim == 3, masks.shape
        self.masks = masks
        self.index = index.long()

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, item) -> Union[torch.Tensor, "IndexedMasks"]:
        if isinstance(item, int):
            return self.masks[self.index[item]]
        return IndexedMasks(self.masks, self.index[item])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.index.tolist():
            yield self.masks[i]

    def to(self, *args, **kwargs) -> "IndexedMasks":
        masks = self.masks.to(*args, **kwargs)
        return IndexedMasks(masks, self.index.to(masks.device))

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
        return IndexedMasks(torch.cat(masks), torch.cat(index))

    def __repr__(self) -> str:
        return f"IndexedMasks(num={len(self)}, unique={self.masks.shape[0]}, size={tuple(self.masks.shape[1:])})"
