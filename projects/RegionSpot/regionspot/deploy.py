"""RegionSpot without torch at serving time: the onnxruntime predictor of an exported folder.

The serving code is the top-level package `regionspot_deploy` (it must import without torch, and
`import regionspot` imports detectron2); this module re-exports it for users of the full package.
Export a model with `regionspot.onnx_export.export_folder` or tools/export_onnx.py.

`OnnxPredictorAdapter` puts an exported folder behind `RegionSpotPredictor`'s interface (torch
`RegionResults`, vocabulary specs such as "coco"), for code written against that predictor, such
as the web demo's `--onnx DIR`.
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

from regionspot_deploy import FolderError, OnnxRegionSpotPredictor, RegionResults, load_manifest

from .modeling.vocabulary import VocabularyLike, vocabulary_names
from .predictor import RegionResults as TorchRegionResults

__all__ = ["OnnxRegionSpotPredictor", "RegionResults", "FolderError", "load_manifest", "OnnxPredictorAdapter"]


class OnnxPredictorAdapter:
    """An exported folder with `RegionSpotPredictor`'s methods: `set_image`, `predict` (torch
    `RegionResults` on the CPU), `vocabulary_embeddings`, `default_vocabulary`, `device`.
    Vocabularies: class names, the exported vocabulary (None or its spec), or another spec whose
    names are embedded with the folder's text graph. SAM's automatic masks are not exported."""

    device = torch.device("cpu")

    def __init__(self, folder: str, top_k: int = 5, **kwargs):
        """
        Args:
            folder: the exported folder (checked by `OnnxRegionSpotPredictor`).
            top_k: classes kept per region by default.
            kwargs: passed to `OnnxRegionSpotPredictor` (providers, int8, ...).
        """
        self.onnx = OnnxRegionSpotPredictor(folder, top_k=top_k, **kwargs)
        self.folder = folder
        self.top_k = top_k
        exported = self.onnx.manifest.get("vocabulary") or {}
        self.default_vocabulary: Optional[str] = exported.get("spec") or None

    def set_image(self, image, format: str = "RGB") -> None:
        self.onnx.set_image(image, format=format)

    def _resolve(self, vocabulary: VocabularyLike):
        if vocabulary is None or (self.default_vocabulary and vocabulary == self.default_vocabulary):
            return None
        if isinstance(vocabulary, str) and not vocabulary.endswith(".npy"):
            return vocabulary_names(vocabulary)  # a spec: its class names, embedded by the text graph
        return vocabulary

    def vocabulary_embeddings(self, vocabulary: VocabularyLike = None) -> Tuple[List[str], torch.Tensor]:
        names, emb = self.onnx.vocabulary_embeddings(self._resolve(vocabulary))
        return list(names), torch.from_numpy(np.asarray(emb))

    def predict(self, boxes=None, points=None, point_labels=None, vocabulary: VocabularyLike = None,
                top_k: Optional[int] = None, prompt_scores=None, return_masks: Optional[bool] = None
                ) -> TorchRegionResults:
        def numpy(x):
            return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x

        r = self.onnx.predict(boxes=numpy(boxes), points=numpy(points), point_labels=numpy(point_labels),
                              vocabulary=self._resolve(vocabulary), top_k=top_k, prompt_scores=numpy(prompt_scores),
                              return_masks=return_masks)
        t = torch.from_numpy
        return TorchRegionResults(
            image_size=tuple(r.image_size), boxes=t(np.ascontiguousarray(r.boxes, dtype=np.float32)),
            masks=None if r.masks is None else t(r.masks), topk_classes=t(r.topk_classes),
            topk_scores=t(np.ascontiguousarray(r.topk_scores)), prompt_indices=t(r.prompt_indices),
            vocabulary=list(r.vocabulary), class_scores=t(np.ascontiguousarray(r.class_scores, dtype=np.float32)))

    def sam_auto_boxes(self) -> torch.Tensor:
        raise RuntimeError(f"SAM's automatic mask generator is not part of the exported folder {self.folder}: "
                           "give box or point prompts.")
