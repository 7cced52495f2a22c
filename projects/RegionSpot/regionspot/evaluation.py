"""Evaluators: detectron2's LVIS and COCO evaluators, fed RegionSpot's shared masks efficiently."""
import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .mask_rle import encode_masks
from .modeling.vocabulary import BUILTIN_VOCABULARIES
from .structures import IndexedMasks, RunLengthMasks
from . import evaluation_results as shards
from . import fast_eval
from .fast_eval import patch_lvis_for_numpy2  # noqa: F401  (its home is the engine; callers import it here too)

logger = logging.getLogger(__name__)



def instances_to_json(instances, img_id: int) -> List[dict]:
    """Like detectron2's `instances_to_coco_json` (the same records), with masks RLE-encoded by
    `regionspot.mask_rle` on their own device, and a mask shared by several detections (one box,
    several classes: `IndexedMasks`) encoded once, from its run lengths or window when it has them."""
    masks = instances.get("pred_masks") if instances.has("pred_masks") else None
    plain = isinstance(masks, torch.Tensor) and masks.dtype == torch.bool and masks.ndim == 3
    compact = isinstance(masks, (IndexedMasks, RunLengthMasks))
    if len(instances) == 0 or instances.has("pred_keypoints") or not (plain or compact):
        return instances_to_coco_json(instances.to("cpu"), img_id)  # no masks, or soft ones: detectron2's way
    boxes = instances.pred_boxes.tensor.detach().cpu().numpy()
    boxes = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
    if plain:
        rles, index = encode_masks(masks), range(len(masks))
    elif isinstance(masks, RunLengthMasks):
        rles, index = masks.to_coco(), range(len(masks))
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
    if used.numel() != len(unique):  # skip the masks no detection refers to
        if isinstance(unique, RunLengthMasks):
            unique = unique.select(used)
        else:
            unique = unique[used.to(unique.device)]
        windows = None if windows is None else windows[used.to(windows.device)]
    if isinstance(unique, RunLengthMasks):  # already run lengths: only the strings to write
        return unique.to_coco(), index.tolist()
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


class _StreamedEvaluation:
    """Replaces the gather-everything core of detectron2's COCO/LVIS evaluators:

    - `process` writes each image's records (`instances_to_json`, dataset category ids) to this
      process's results shards (`evaluation_results`) at once; nothing is kept in memory;
    - `evaluate` (main process, after a barrier) reads the shards once, writes detectron2's
      results JSON from them (streamed), and computes the metrics with `fast_eval` by chunks of
      categories. The metrics dict, its keys and the logged tables are detectron2's.

    With `resume`, the complete shards of an interrupted run are kept (the test loader then
    skips their images, see `evaluation_results.completed_image_ids`) and evaluated with the new ones.
    """

    def _init_streaming(self, *, resume: bool = False, engine: str = "auto", images_per_shard: int = 100,
                        dets_per_chunk: int = fast_eval.DEFAULT_DETS_PER_CHUNK, fingerprint: str = "",
                        processes: int = 0) -> None:
        fast_eval.resolve_engine(engine)  # a bad name fails here, not after the whole inference
        if resume and not self._output_dir:
            raise ValueError("Resuming an evaluation needs an output folder (where its results shards are).")
        self._resume, self._engine = resume, engine
        self._images_per_shard, self._dets_per_chunk = images_per_shard, dets_per_chunk
        self._fingerprint = fingerprint
        self._processes = processes
        self._results_folder = None
        self._writer = None

    def _dataset_category_ids(self) -> Optional[List[int]]:
        """Dataset category id of each contiguous class (None: LVIS's own, the class + 1)."""
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if mapping:
            inverse = {v: k for k, v in mapping.items()}
            return [inverse[i] for i in range(len(inverse))]
        return None

    def reset(self):
        self._predictions = []  # detectron2's attribute, kept empty: the records are on disk
        if self._output_dir:
            folder = shards.results_folder(self._output_dir)
        else:  # no output folder: a temporary one, shared by the processes of this machine
            made = tempfile.mkdtemp(prefix="regionspot-results-") if comm.is_main_process() else None
            folder = comm.all_gather(made)[0]
        error = None
        if comm.is_main_process():
            try:
                shards.prepare_folder(folder, resume=self._resume, fingerprint=self._fingerprint)
            except ValueError as e:
                error = str(e)
        error = comm.all_gather(error)[0]  # a barrier too; every process stops on the main one's error
        if error:
            raise ValueError(error)
        self._results_folder = folder
        self._to_dataset_id = self._dataset_category_ids()
        self._writer = shards.ShardWriter(folder, comm.get_rank(), self._images_per_shard)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            # Masks are RLE-encoded where they are (instances_to_json): only counts and numbers reach the host.
            records = instances_to_json(out["instances"], inp["image_id"])
            ids = self._to_dataset_id
            for rec in records:
                c = rec["category_id"]
                if ids is None:
                    rec["category_id"] = c + 1
                    continue
                if not 0 <= c < len(ids):
                    raise ValueError(f"A prediction of image {inp['image_id']} has class {c}, but the dataset "
                                     f"{self._metadata.name!r} has {len(ids)} classes.")
                rec["category_id"] = ids[c]
            self._writer.add(inp["image_id"], records)

    def evaluate(self, img_ids=None):
        self._writer.close()
        written = comm.gather(self._writer.image_ids, dst=0)  # a barrier too
        if not comm.is_main_process():
            return self._not_main_result
        try:
            return self._evaluate_shards(img_ids, {i for ids in written for i in ids})
        finally:
            if not self._output_dir:
                shutil.rmtree(self._results_folder, ignore_errors=True)

    def _evaluate_shards(self, img_ids, written: set):
        folder = self._results_folder
        completed = shards.completed_image_ids(folder)
        unseen = written - completed
        if unseen:  # other machines wrote shards this one cannot read
            raise RuntimeError(
                f"The results of {len(unseen)} images written by other processes (e.g. image {min(unseen)}) are not "
                f"in {folder}: the processes of an evaluation write their results there, so OUTPUT_DIR must be "
                "on a filesystem every machine shares (with no OUTPUT_DIR, on a single machine).")
        done = len(completed)
        if not done:
            self._logger.warning(f"[{type(self).__name__}] Did not receive valid predictions.")
            return {}
        first = shards.first_records(folder)
        tasks = self._tasks or (("bbox", "segm") if first and "segmentation" in first[0] else ("bbox",))
        lines = shards.iter_lines(folder)
        if self._output_dir:
            path = os.path.join(self._output_dir, self._results_file)
            self._logger.info(f"Saving results of {done} images to {path} (from the shards in {folder})")
            lines = shards.write_results_json(lines, path)
        images = shards.parse_lines(lines)
        self._results = OrderedDict()
        gt = self._ground_truth()
        if not gt.has_annotations or first is None:
            for _ in images:  # the results file is still written
                pass
            if not gt.has_annotations:
                self._logger.info("Annotations are not available for evaluation.")
            else:
                self._logger.warning("No predictions from the model!")
                for task in sorted(tasks):
                    self._results[task] = {m: float("nan") for m in self._metrics(task)}
            return copy.deepcopy(self._results)
        self._logger.info(f"Evaluating predictions of {done} images ...")
        summaries = fast_eval.evaluate_results(
            gt, images, sorted(tasks), max_dets=self._max_dets(), engine=self._engine,
            dets_per_chunk=self._dets_per_chunk, img_ids=img_ids, work_dir=self._output_dir or None,
            processes=self._processes)
        for task in sorted(tasks):
            self._results[task] = self._metrics_of(summaries[task], task)
        return copy.deepcopy(self._results)


class _PrintsToLog:
    """lvis and pycocotools print their progress and AP tables with print(): send that to the log
    (the run's log.txt; the console only with --verbose), beside detectron2's own result tables."""

    def evaluate(self, *args, **kwargs):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                return super().evaluate(*args, **kwargs)
        finally:
            if buf.getvalue().strip():
                logger.info("Evaluation output:\n" + buf.getvalue().rstrip())


LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class RegionSpotLVISEvaluator(_PrintsToLog, _StreamedEvaluation, LVISEvaluator):
    """detectron2's LVISEvaluator, with results streamed to disk and the fast chunked evaluation
    (`_StreamedEvaluation`). Its ground truth is read at evaluation time, not at construction."""

    _results_file = "lvis_instances_results.json"
    _not_main_result = None

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *, max_dets_per_image=None,
                 **streaming):
        # LVISEvaluator.__init__ loads the whole LVIS api (GBs for LVIS val) only to keep it: set its
        # attributes without that; fast_eval reads the file when it evaluates.
        DatasetEvaluator.__init__(self)
        self._logger = logging.getLogger("detectron2.evaluation.lvis_evaluation")
        self._tasks, self._distributed, self._output_dir = tasks, distributed, output_dir
        self._max_dets_per_image = max_dets_per_image
        self._cpu_device = torch.device("cpu")
        self._metadata = MetadataCatalog.get(dataset_name)
        self._init_streaming(**streaming)

    def _max_dets(self) -> int:
        return 300 if self._max_dets_per_image is None else self._max_dets_per_image

    def _ground_truth(self):
        return fast_eval.GroundTruth(PathManager.get_local_path(self._metadata.json_file), lvis_style=True)

    def _metrics(self, task):
        return LVIS_METRICS

    def _metrics_of(self, ev, task):
        ev.print_results()
        results = {m: float(ev.results[m] * 100) for m in LVIS_METRICS}
        self._logger.info(f"Evaluation results for {task}: \n" + create_small_table(results))
        return results

    def evaluate(self, img_ids=None):
        patch_lvis_for_numpy2()
        return super().evaluate(img_ids)


class RegionSpotCOCOEvaluator(_PrintsToLog, _StreamedEvaluation, COCOEvaluator):
    """detectron2's COCOEvaluator, with results streamed to disk and the fast chunked evaluation
    (`_StreamedEvaluation`)."""

    _results_file = "coco_instances_results.json"
    _not_main_result = {}

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *, max_dets_per_image=None,
                 **streaming):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self._init_streaming(**streaming)

    def _max_dets(self) -> int:
        return self._max_dets_per_image[2]

    def _ground_truth(self):
        return fast_eval.GroundTruth(self._coco_api.dataset, lvis_style=False)

    def _metrics(self, task):
        return ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def _metrics_of(self, ev, task):
        print(ev.summary_text, end="")
        return self._derive_coco_results(ev, task, class_names=self._metadata.get("thing_classes"))


def _config_fingerprint(cfg) -> str:
    """A digest of the config, without the keys that may change between a run and its resumption
    without changing its detections (how it runs, where, how its results are evaluated)."""
    import hashlib

    c = cfg.clone()
    c.defrost()
    e = c.MODEL.REGIONSPOT.EVAL
    e.RESUME, e.ENGINE, e.IMAGES_PER_SHARD, e.DETS_PER_CHUNK = False, "auto", 0, 0
    c.MODEL.DEVICE, c.DATALOADER.NUM_WORKERS, c.MODEL.REGIONSPOT.TEST_IMS_PER_BATCH = "", 0, 0
    return hashlib.sha256(c.dump().encode()).hexdigest()[:16]


def default_output_folder(cfg, dataset_name: str) -> str:
    """Where the evaluation of `dataset_name` writes: OUTPUT_DIR/inference/<dataset>."""
    return os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)


def build_regionspot_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """`regionspot_evaluator` as a yacs config says: masks if MASK_ON, TEST.DETECTIONS_PER_IMAGE,
    MODEL.REGIONSPOT.EVAL (engine, resume, shard and chunk sizes)."""
    output_folder = output_folder or default_output_folder(cfg, dataset_name)
    e = cfg.MODEL.REGIONSPOT.EVAL
    return regionspot_evaluator(dataset_name, output_folder, mask_on=cfg.MODEL.REGIONSPOT.MASK_ON,
                                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, resume=e.RESUME,
                                engine=e.ENGINE, images_per_shard=e.IMAGES_PER_SHARD,
                                dets_per_chunk=e.DETS_PER_CHUNK, fingerprint=_config_fingerprint(cfg),
                                processes=e.PROCESSES)


def regionspot_evaluator(dataset_name: str, output_dir: Optional[str] = None, *, mask_on: bool = True,
                         max_dets_per_image: int = 300, resume: bool = False, engine: str = "auto",
                         images_per_shard: int = 100, dets_per_chunk: int = fast_eval.DEFAULT_DETS_PER_CHUNK,
                         fingerprint: str = "", processes: int = 0) -> DatasetEvaluator:
    """LVIS-format data -> LVISEvaluator, COCO-format -> COCOEvaluator; bbox, plus segm with masks.

    Args:
        dataset_name: a registered dataset; its metadata's `evaluator_type` picks the evaluator.
        output_dir: where the results shards and the results JSON go (None = a temporary folder).
        mask_on: evaluate masks too.
        max_dets_per_image: detections per image the evaluator counts (LVIS allows 300).
        resume: keep the complete results shards of an interrupted run in `output_dir`.
        engine: "auto" (faster-coco-eval where installed), "faster_coco_eval" or "reference"
            (the lvis package / pycocotools).
        images_per_shard: images per results shard (at most what a killed run loses per process).
        dets_per_chunk: detections evaluated together at most (bounds the evaluation's memory).
        fingerprint: what produced the results; a resumed run with another one is refused.
        processes: processes of the final evaluation (0: one per CPU, at most 8; each holds the
            ground truth, so they bound its memory).
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    tasks = ("bbox", "segm") if mask_on else ("bbox",)
    streaming = dict(resume=resume, engine=engine, images_per_shard=images_per_shard,
                     dets_per_chunk=dets_per_chunk, fingerprint=fingerprint, processes=processes)
    if evaluator_type == "lvis":
        return RegionSpotLVISEvaluator(dataset_name, tasks, True, output_dir, max_dets_per_image=max_dets_per_image,
                                       **streaming)
    if evaluator_type == "coco":
        return RegionSpotCOCOEvaluator(dataset_name, tasks, True, output_dir, max_dets_per_image=max_dets_per_image,
                                       **streaming)
    raise NotImplementedError(
        f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
        "RegionSpot evaluates LVIS- and COCO-format datasets."
    )
