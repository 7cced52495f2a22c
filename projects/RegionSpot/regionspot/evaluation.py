"""Evaluators: detectron2's LVIS and COCO evaluators, fed RegionSpot's shared masks efficiently."""
import contextlib
import io
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import BoxMode

from .mask_rle import encode_masks
from .modeling.vocabulary import BUILTIN_VOCABULARIES
from .structures import IndexedMasks

logger = logging.getLogger(__name__)


def patch_lvis_for_numpy2() -> None:
    """lvis 0.5.3 (the latest release) calls `np.float`, which NumPy 1.24 removed.

    This is the one place that works around it: restore the alias to the builtin `float`,
    which is exactly what `np.float` was. Pinning numpy<1.24 instead would drag old matplotlib,
    contourpy and opencv along.
    """
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def instances_to_json(instances, img_id: int) -> List[dict]:
    """Like detectron2's `instances_to_coco_json` (the same records), with masks RLE-encoded by
    `regionspot.mask_rle` on their own device, and a mask shared by several detections (one box,
    several classes: `IndexedMasks`) encoded once, from its window when it has one."""
    masks = instances.get("pred_masks") if instances.has("pred_masks") else None
    plain = isinstance(masks, torch.Tensor) and masks.dtype == torch.bool and masks.ndim == 3
    if len(instances) == 0 or instances.has("pred_keypoints") or not (plain or isinstance(masks, IndexedMasks)):
        return instances_to_coco_json(instances.to("cpu"), img_id)  # no masks, or soft ones: detectron2's way
    boxes = instances.pred_boxes.tensor.detach().cpu().numpy()
    boxes = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
    if plain:
        rles, index = encode_masks(masks), range(len(masks))
    else:
        rles, index = _encode_shared(masks)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return [
        {"image_id": img_id, "category_id": c, "bbox": b, "score": s, "segmentation": rles[i]}
        for b, s, c, i in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist(), index)
    ]


def _encode_shared(masks: IndexedMasks) -> Tuple[List[dict], List[int]]:
    """RLEs of the unique masks some detection refers to, and each detection's RLE index."""
    used, index = masks.index.unique(return_inverse=True)
    unique, windows = masks.masks, masks.windows
    if used.numel() != unique.shape[0]:  # skip the masks no detection refers to
        unique = unique[used.to(unique.device)]
        windows = None if windows is None else windows[used.to(windows.device)]
    return encode_masks(unique, windows), index.tolist()


def category_ids(spec: Optional[str], num_classes: int) -> List[int]:
    """Category ids of a vocabulary's classes: the dataset's own ids when `spec` names a dataset
    (or "lvis" / "coco") of `num_classes` classes, else 1..C as in COCO."""
    if spec:
        meta = MetadataCatalog.get(BUILTIN_VOCABULARIES.get(spec, spec))
        mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
        if mapping and len(mapping) == num_classes:
            inverse = {v: k for k, v in mapping.items()}
            return [inverse[i] for i in range(num_classes)]
    return list(range(1, num_classes + 1))


def named_results_json(instances, img_id, class_names: Sequence[str], ids: Sequence[int]) -> List[dict]:
    """COCO-format results (`instances_to_json`) of a vocabulary's detections: `category_id` is the
    vocabulary's id of the class (`category_ids`), and every entry also names it (`category_name`).
    What the demos write."""
    records = instances_to_json(instances, img_id)
    for rec in records:
        contiguous = rec["category_id"]
        rec["category_name"] = class_names[contiguous]
        rec["category_id"] = ids[contiguous]
    return records


class _SharedMaskProcess:
    """Overrides `process` of detectron2's COCO/LVIS evaluators to use `instances_to_json`."""

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            prediction = {"image_id": inp["image_id"]}
            if "instances" in out:
                instances = out["instances"].to(self._cpu_device)
                prediction["instances"] = instances_to_json(instances, inp["image_id"])
            if len(prediction) > 1:
                self._predictions.append(prediction)


class _PrintsToLog:
    """lvis and pycocotools print their progress and AP tables with print(): send that to the log
    (the run's log.txt; the console only with --verbose), beside detectron2's own result tables."""

    def evaluate(self):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                return super().evaluate()
        finally:
            if buf.getvalue().strip():
                logger.info("Evaluation output:\n" + buf.getvalue().rstrip())


class RegionSpotLVISEvaluator(_PrintsToLog, _SharedMaskProcess, LVISEvaluator):
    def evaluate(self):
        patch_lvis_for_numpy2()
        return super().evaluate()


class RegionSpotCOCOEvaluator(_PrintsToLog, _SharedMaskProcess, COCOEvaluator):
    pass


def build_regionspot_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """`regionspot_evaluator` as a yacs config says: masks if MASK_ON, TEST.DETECTIONS_PER_IMAGE."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return regionspot_evaluator(dataset_name, output_folder, mask_on=cfg.MODEL.REGIONSPOT.MASK_ON,
                                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)


def regionspot_evaluator(dataset_name: str, output_dir: Optional[str] = None, *, mask_on: bool = True,
                         max_dets_per_image: int = 300) -> DatasetEvaluator:
    """LVIS-format data -> LVISEvaluator, COCO-format -> COCOEvaluator; bbox, plus segm with masks.

    Args:
        dataset_name: a registered dataset; its metadata's `evaluator_type` picks the evaluator.
        output_dir: where the results JSON goes (None = nowhere).
        mask_on: evaluate masks too.
        max_dets_per_image: detections per image the evaluator counts (LVIS allows 300).
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    tasks = ("bbox", "segm") if mask_on else ("bbox",)
    if evaluator_type == "lvis":
        return RegionSpotLVISEvaluator(dataset_name, tasks, True, output_dir, max_dets_per_image=max_dets_per_image)
    if evaluator_type == "coco":
        return RegionSpotCOCOEvaluator(dataset_name, tasks, True, output_dir, max_dets_per_image=max_dets_per_image)
    raise NotImplementedError(
        f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
        "RegionSpot evaluates LVIS- and COCO-format datasets."
    )
