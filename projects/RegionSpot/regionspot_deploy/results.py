"""What both predictors' `RegionResults` share, whatever their arrays are (numpy or torch): the
per-region views, selection, records and repr. Torch-free, so the onnxruntime predictor can use it."""
import dataclasses
from typing import Any, Callable, Dict, List

import numpy as np

# The per-region fields (first axis = regions); `masks` and `class_scores` may be None.
REGION_FIELDS = ("boxes", "masks", "topk_classes", "topk_scores", "prompt_indices", "class_scores")


class RegionResultsBase:
    """Methods of a `RegionResults` dataclass with the fields image_size, REGION_FIELDS and
    vocabulary."""

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def classes(self):
        """(N,) index of the best class of each region."""
        return self.topk_classes[:, 0]

    @property
    def scores(self):
        """(N,) score of the best class of each region."""
        return self.topk_scores[:, 0]

    @property
    def class_names(self) -> List[str]:
        return [self.vocabulary[i] for i in self.classes.tolist()]

    @property
    def topk_names(self) -> List[List[str]]:
        return [[self.vocabulary[i] for i in row] for row in self.topk_classes.tolist()]

    def _index(self, item: Any) -> Any:
        """`item` as the arrays take it (e.g. on their device)."""
        return item

    def _apply(self, fn: Callable[[Any], Any]):
        """A copy with `fn` applied to every per-region array present."""
        return dataclasses.replace(self, **{f: None if getattr(self, f) is None else fn(getattr(self, f))
                                            for f in REGION_FIELDS})

    def __getitem__(self, item):
        """A subset of the regions: an int, a slice, an index array or a boolean mask."""
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            item = slice(item, item + 1 if item != -1 else None)
        item = self._index(item)
        return self._apply(lambda x: x[item])

    def to_records(self) -> List[Dict]:
        """Plain-Python summaries of the regions (no masks), e.g. to print or to save as JSON."""
        return [
            {"prompt_index": p, "box": b, "class": n, "score": s,
             "alternatives": [[self.vocabulary[c], v] for c, v in zip(tc, ts)]}
            for p, b, n, s, tc, ts in zip(
                self.prompt_indices.tolist(), self.boxes.tolist(), self.class_names,
                self.scores.tolist(), self.topk_classes.tolist(), self.topk_scores.tolist(),
            )
        ]

    def __repr__(self) -> str:
        return (f"RegionResults(num_regions={len(self)}, image_size={self.image_size}, "
                f"top_k={self.topk_classes.shape[1]}, vocabulary_size={len(self.vocabulary)})")
