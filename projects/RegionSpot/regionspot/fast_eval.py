"""Exact LVIS / COCO AP of a results set too large to hold in memory.

AP, APr/APc/APf and APs/APm/APl are means over categories of per-category precision (the
`lvis` package and pycocotools both fill a category's entries of `precision` / `recall` from
that category's detections and ground truth alone, -1 where it has no ground truth). So the
detections are streamed once into bucket files on disk by category, each chunk of categories is
evaluated alone with a bounded number of detections, the per-category arrays are concatenated
in category order, and the packages' own `summarize` runs on the whole: the figures are the
same numbers the one-shot evaluation gives.

Before bucketing, each image keeps its top `max_dets` detections over all classes, as
`lvis.LVISResults` does (faster-coco-eval would cap per image and class), and for LVIS the
detections of a class that is neither in the image's ground truth nor in its
`neg_category_ids` are dropped: `lvis.LVISEval` ignores them, so they cannot change a figure.

Engines: faster-coco-eval (C++, extra `regionspot[fasteval]`) where installed, else the `lvis`
package (LVIS) or pycocotools (COCO), which stay the reference.
"""
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import types
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

ENGINES = ("auto", "faster_coco_eval", "reference")
# Detections (after the per-image cut and LVIS's filter) evaluated together at most, unless one
# bucket alone has more: about 2 GB with faster-coco-eval on masks (~6 KB a detection).
DEFAULT_DETS_PER_CHUNK = 300_000
# (image, category) pairs evaluated together at most: the engines loop over every pair.
DEFAULT_PAIRS_PER_CHUNK = 20_000
CATEGORIES_PER_BUCKET = 4
# Processes of the final evaluation when none is given: one per CPU, but no more than this (each
# holds the ground truth; a 128-core machine would otherwise fork 128 of them).
MAX_DEFAULT_PROCESSES = 8


def patch_lvis_for_numpy2() -> None:
    """lvis 0.5.3 (the latest release) calls `np.float`, which NumPy 1.24 removed.

    This is the one place that works around it: restore the alias to the builtin `float`,
    which is exactly what `np.float` was. Pinning numpy<1.24 instead would drag old matplotlib,
    contourpy and opencv along.
    """
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str) -> str:
    """"auto" -> "faster_coco_eval" where installed, else "reference"; a named one is checked."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown evaluation engine {engine!r}; choose one of {ENGINES}.")
    if engine == "auto":
        return "faster_coco_eval" if faster_coco_eval_available() else "reference"
    if engine == "faster_coco_eval" and not faster_coco_eval_available():
        raise ImportError("Evaluation engine 'faster_coco_eval' needs faster-coco-eval: "
                          "pip install 'regionspot[fasteval]' (faster-coco-eval==1.8.0).")
    return engine


class GroundTruth:
    """A LVIS- or COCO-format ground-truth file, indexed for chunked evaluation."""

    def __init__(self, json_file_or_dict, lvis_style: bool):
        if isinstance(json_file_or_dict, dict):
            data, self.source = json_file_or_dict, "<dict>"
        else:
            self.source = str(json_file_or_dict)
            with open(json_file_or_dict) as f:
                data = json.load(f)
        for key in ("images", "categories"):
            if key not in data:
                raise KeyError(f"Ground-truth file {self.source} has no {key!r}.")
        self.lvis_style = lvis_style
        self.info = data.get("info", {})
        self.images = data["images"]
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        if lvis_style:
            bad = [c["id"] for c in self.categories if c.get("frequency") not in ("r", "c", "f")]
            if bad:
                raise ValueError(f"Ground-truth file {self.source}: categories {bad[:10]} have no LVIS "
                                 "'frequency' (r, c or f).")
        self.cat_index = {c: i for i, c in enumerate(self.cat_ids)}
        self.anns_by_cat: Dict[int, List[dict]] = defaultdict(list)
        self.pos_cats: Dict[int, set] = defaultdict(set)
        for ann in data.get("annotations", []):
            self.anns_by_cat[ann["category_id"]].append(ann)
            self.pos_cats[ann["image_id"]].add(ann["category_id"])
        self.has_annotations = bool(data.get("annotations"))
        self.image_ids = sorted(img["id"] for img in self.images)
        self._image_by_id = {img["id"]: img for img in self.images}
        self.neg_cats = {img["id"]: set(img.get("neg_category_ids", ())) for img in self.images}

    def chunk_dataset(self, cat_ids: Sequence[int], img_ids: Sequence[int]) -> dict:
        """The ground truth of these categories on these images, as a dataset dict (annotations
        copied: the engines add fields to them)."""
        wanted, images = set(cat_ids), set(img_ids)
        return {
            "info": self.info,
            "images": [self._image_by_id[i] for i in img_ids],
            "categories": [c for c in self.categories if c["id"] in wanted],
            "annotations": [dict(a) for c in cat_ids for a in self.anns_by_cat.get(c, ()) if a["image_id"] in images],
        }


def cut_per_image(records: List[dict], max_dets: int) -> List[dict]:
    """The image's top `max_dets` detections over all classes, exactly as `lvis.LVISResults`
    keeps them (a stable sort by score, so ties keep their order)."""
    if max_dets < 0 or len(records) <= max_dets:
        return records
    return sorted(records, key=lambda r: r["score"], reverse=True)[:max_dets]


class Buckets:
    """Detections on disk, one file per range of `CATEGORIES_PER_BUCKET` categories, one line per
    detection in the order they came (which keeps every (image, category) list in its order).
    A line is ``image_id TAB category_id TAB score TAB x,y,w,h TAB segmentation`` (floats as
    `repr`, which round-trips exactly; segmentation ``R<h>,<w>,<counts>`` for a compressed RLE,
    else ``J<json>``): a fraction of JSON's cost to write and read."""

    def __init__(self, folder: str, num_categories: int, per_bucket: int = CATEGORIES_PER_BUCKET):
        self.folder = folder
        self.per_bucket = per_bucket
        self.num = (num_categories + per_bucket - 1) // per_bucket
        self.counts = [0] * self.num
        self.images = [set() for _ in range(self.num)]  # the images with detections in each bucket
        self._files = [None] * self.num

    def path(self, b: int) -> str:
        return os.path.join(self.folder, f"bucket{b:05d}.tsv")

    def add(self, bucket: int, image_id: int, line: str) -> None:
        f = self._files[bucket]
        if f is None:
            f = self._files[bucket] = open(self.path(bucket), "a", buffering=1 << 16)
        f.write(line)
        self.counts[bucket] += 1
        self.images[bucket].add(image_id)

    def close(self) -> None:
        for f in self._files:
            if f is not None:
                f.close()
        self._files = [None] * self.num

    def read(self, bucket: int) -> List[str]:
        if not self.counts[bucket]:
            return []
        with open(self.path(bucket)) as f:
            return f.readlines()

    def chunks(self, dets_per_chunk: int, gt: Optional["GroundTruth"] = None,
               pairs_per_chunk: int = 0) -> List[Tuple[List[int], List[int]]]:
        """Consecutive buckets grouped to at most `dets_per_chunk` detections and (with `gt`) at
        most `pairs_per_chunk` (image, category) pairs, or one bucket: [(buckets, image ids)].
        A chunk's images are those with detections or ground truth of its categories: a pair
        with neither counts in no figure, and every engine loops over all the pairs it is given."""
        chunks, current, n, images = [], [], 0, set()
        for b in range(self.num):
            mine = set(self.images[b])
            if gt is not None:
                for c in gt.cat_ids[b * self.per_bucket: (b + 1) * self.per_bucket]:
                    mine.update(a["image_id"] for a in gt.anns_by_cat.get(c, ()))
            pairs = len(images | mine) * (len(current) + 1) * self.per_bucket
            too_many_pairs = bool(pairs_per_chunk) and pairs > pairs_per_chunk
            if current and (n + self.counts[b] > dets_per_chunk or too_many_pairs):
                chunks.append((current, sorted(images)))
                current, n, images = [], 0, set()
            current.append(b)
            n += self.counts[b]
            images |= mine
        if current:
            chunks.append((current, sorted(images)))
        return chunks


def _encode(r: dict) -> str:
    seg = r.get("segmentation")
    if seg is None:
        s = ""
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        s = f"R{seg['size'][0]},{seg['size'][1]},{seg['counts']}"
    else:
        s = "J" + json.dumps(seg)
    box = r.get("bbox")
    if box is None:
        b = ""
    elif len(box) == 4:  # repr of an int or float reads back as the same value
        b = f"{box[0]!r},{box[1]!r},{box[2]!r},{box[3]!r}"
        if "(" in b:  # numpy scalars: np.float32(...)
            b = ",".join(repr(float(v)) for v in box)
    else:
        raise ValueError(f"A detection of image {r['image_id']} has a bbox of {len(box)} numbers: {box}")
    score = r["score"]
    return f"{r['image_id']}\t{r['category_id']}\t{score if type(score) is float else float(score)!r}\t{b}\t{s}\n"


def _decode(line: str, task: str) -> dict:
    """A bucket line as the record one task evaluates: segm without the box (its area is then the
    mask's, as detectron2 has it), bbox without the mask."""
    image_id, cat, score, box, seg = line.rstrip("\n").split("\t")
    d = {"image_id": int(image_id), "category_id": int(cat), "score": float(score)}
    if task == "bbox":
        if not box:
            raise KeyError(f"A detection of image {image_id} has no 'bbox' to evaluate.")
        d["bbox"] = [float(v) for v in box.split(",")]
    else:
        if not seg:
            raise KeyError(f"A detection of image {image_id} has no 'segmentation' to evaluate masks.")
        if seg[0] == "R":
            h, w, counts = seg[1:].split(",", 2)
            d["segmentation"] = {"size": [int(h), int(w)], "counts": counts}
        else:
            d["segmentation"] = json.loads(seg[1:])
    return d


def bucket_detections(gt: GroundTruth, images: Iterable[List[dict]], buckets: Buckets, *, max_dets: int,
                      img_ids: Optional[Iterable[int]] = None) -> int:
    """Stream each image's records into `buckets`: cut to `max_dets` per image (LVIS), LVIS's
    unverified classes dropped; returns how many records were read."""
    known = set(gt.image_ids) if img_ids is None else set(img_ids)
    seen = 0
    per_bucket = buckets.per_bucket
    for records in images:
        if not records:
            continue
        seen += len(records)
        image_id = records[0]["image_id"]
        if image_id not in known:
            if img_ids is not None:
                continue
            raise KeyError(f"Detections of image {image_id}, which the ground truth {gt.source} does not have.")
        if gt.lvis_style:
            records = cut_per_image(records, max_dets)
            verified = gt.pos_cats.get(image_id, set()) | gt.neg_cats[image_id]
        for r in records:
            c = r["category_id"]
            index = gt.cat_index.get(c)
            if index is None:
                raise KeyError(f"A detection of image {image_id} has category_id {c}, which the ground "
                               f"truth {gt.source} does not have.")
            if gt.lvis_style and c not in verified:
                continue
            buckets.add(index // per_bucket, image_id, _encode(r))
    buckets.close()
    return seen


# ------------------------------------------------------------------------------ chunk engines
def _faster_results(coco_gt, dets: List[dict], task: str):
    """faster-coco-eval's `COCO.loadRes(dets)`, with the area and box of the masks computed by its
    mask module in one call each instead of one call per detection."""
    from faster_coco_eval import COCO
    from faster_coco_eval.core import mask as mask_utils

    if task == "segm" and dets:
        segs = [d["segmentation"] for d in dets]
        areas, boxes = mask_utils.area(segs), mask_utils.toBbox(segs)
        for i, d in enumerate(dets):
            d["area"], d["bbox"], d["id"], d["iscrowd"] = areas[i], boxes[i], i + 1, 0
    else:
        for i, d in enumerate(dets):
            bb = d["bbox"]
            d["area"], d["id"], d["iscrowd"] = bb[2] * bb[3], i + 1, 0
    res = COCO(print_function=coco_gt.print_function)
    res.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                   "annotations": dets}
    res.createIndex()
    return res


def _eval_chunk_faster(gt_chunk: dict, dets: List[dict], task: str, lvis_style: bool, max_dets: int,
                       img_ids: Sequence[int]):
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = COCO(gt_chunk, print_function=quiet)
    ev = COCOeval_faster(coco_gt, _faster_results(coco_gt, dets, task), task, lvis_style=lvis_style,
                         print_function=quiet)
    ev.params.catIds = [c["id"] for c in gt_chunk["categories"]]
    ev.params.imgIds = list(img_ids)
    ev.params.maxDets = [max_dets] if lvis_style else [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    return np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"])


def _eval_chunk_lvis(gt_chunk: dict, dets: List[dict], task: str, max_dets: int, img_ids: Sequence[int]):
    from lvis import LVIS, LVISEval, LVISResults


    patch_lvis_for_numpy2()
    lvis_gt = LVIS.__new__(LVIS)  # LVIS() only reads a file; this is its constructor on a dict
    lvis_gt.logger, lvis_gt.dataset = logging.getLogger("lvis"), gt_chunk
    lvis_gt._create_index()
    cat_ids = [c["id"] for c in gt_chunk["categories"]]
    if not dets:  # LVISResults cannot take an empty list: no detections, so precision 0 where there is gt
        return _no_detections(gt_chunk, cat_ids, img_ids, task, lvis_style=True)
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=-1), task)
    ev.params.cat_ids, ev.params.img_ids = cat_ids, list(img_ids)
    ev.params.max_dets = max_dets
    ev.evaluate()
    ev.accumulate()
    return ev.eval["precision"][..., None], ev.eval["recall"][..., None]


def _eval_chunk_coco(gt_chunk: dict, dets: List[dict], task: str, max_dets: int, img_ids: Sequence[int]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = [c["id"] for c in gt_chunk["categories"]]
    if not dets:
        return _no_detections(gt_chunk, cat_ids, img_ids, task, lvis_style=False)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_chunk
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), task)
        ev.params.catIds, ev.params.imgIds = cat_ids, list(img_ids)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"], ev.eval["recall"]


def _no_detections(gt_chunk, cat_ids, img_ids, task, lvis_style):
    """precision / recall of categories without detections: 0 where an area range has gt that
    counts, else -1 (what both packages' accumulate give)."""
    from lvis.eval import Params

    area_rngs = Params(task).area_rng
    images = set(img_ids)
    valid = np.zeros((len(cat_ids), len(area_rngs)), dtype=bool)
    index = {c: i for i, c in enumerate(cat_ids)}
    for a in gt_chunk["annotations"]:
        ignored = a.get("ignore", 0) if lvis_style else a.get("iscrowd", 0)  # as each package sets it
        if a["image_id"] not in images or ignored:
            continue
        for j, (lo, hi) in enumerate(area_rngs):
            if lo <= a["area"] <= hi:
                valid[index[a["category_id"]], j] = True
    m = 1 if lvis_style else 3
    precision = np.where(valid[None, None, :, :, None], 0.0, -1.0) * np.ones((10, 101, 1, 1, m))
    recall = np.where(valid[None, :, :, None], 0.0, -1.0) * np.ones((10, 1, 1, m))
    return precision, recall


def evaluate_chunk(gt_chunk: dict, dets: List[dict], task: str, *, lvis_style: bool, max_dets: int,
                   img_ids: Sequence[int], engine: str) -> Tuple[np.ndarray, np.ndarray]:
    """precision (T, R, K, A, M) and recall (T, K, A, M) of one chunk of categories, from its
    bucket lines `dets`."""
    dets = [_decode(line, task) for line in dets]
    if engine == "faster_coco_eval":
        return _eval_chunk_faster(gt_chunk, dets, task, lvis_style, max_dets, img_ids)
    if lvis_style:
        return _eval_chunk_lvis(gt_chunk, dets, task, max_dets, img_ids)
    return _eval_chunk_coco(gt_chunk, dets, task, max_dets, img_ids)


# ------------------------------------------------------------------------------ summaries
def lvis_summary(gt: GroundTruth, precision: np.ndarray, recall: np.ndarray, task: str, max_dets: int):
    """The `lvis` package's LVISEval, summarized on these arrays: `.results` holds AP, APr, ...
    and `.print_results()` prints its table."""
    from lvis.eval import LVISEval, Params

    ev = LVISEval.__new__(LVISEval)  # its constructor wants the detections; summarize needs only these
    ev.logger = logging.getLogger("lvis")
    ev.params = Params(iou_type=task)
    ev.params.cat_ids, ev.params.img_ids = list(gt.cat_ids), list(gt.image_ids)  # max_dets stays 300, as in LVISEval
    cats = {c["id"]: c for c in gt.categories}
    ev.lvis_gt = types.SimpleNamespace(load_cats=lambda ids: [cats[i] for i in ids])
    ev.freq_groups = ev._prepare_freq_group()
    ev.eval = {"precision": precision[..., 0], "recall": recall[..., 0]}
    ev.results = OrderedDict()
    ev.summarize()
    return ev


def coco_summary(gt: GroundTruth, precision: np.ndarray, recall: np.ndarray, task: str, max_dets: int,
                 img_ids: Sequence[int]):
    """pycocotools' COCOeval (detectron2's COCOevalMaxDets unless max_dets is 100), summarized on
    these arrays: `.stats` holds its 12 figures, `.eval["precision"]` the per-category ones."""
    from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
    from pycocotools.cocoeval import COCOeval

    ev = (COCOeval if max_dets == 100 else COCOevalMaxDets)(None, None, task)
    ev.params.catIds, ev.params.imgIds = list(gt.cat_ids), list(img_ids)
    ev.params.maxDets = [1, 10, max_dets]
    ev.eval = {"params": ev.params, "counts": list(precision.shape), "precision": precision, "recall": recall}
    ev.summarize()
    return ev


# ------------------------------------------------------------------------------ the whole
def _evaluate_chunks(gt: GroundTruth, buckets: Buckets, chunks, tasks: Sequence[str], indices: Sequence[int], *,
                     max_dets: int, engine: str, start: float) -> Dict[str, np.ndarray]:
    """Precision and recall of these chunks, every task: {"<task>/precision/<i>": array, ...}."""
    out = {}
    for n, i in enumerate(indices):
        chunk, chunk_images = chunks[i]
        lo, hi = chunk[0] * buckets.per_bucket, min((chunk[-1] + 1) * buckets.per_bucket, len(gt.cat_ids))
        lines = [line for b in chunk for line in buckets.read(b)]
        for task in tasks:
            p, r = evaluate_chunk(gt.chunk_dataset(gt.cat_ids[lo:hi], chunk_images), lines, task,
                                  lvis_style=gt.lvis_style, max_dets=max_dets, img_ids=chunk_images, engine=engine)
            out[f"{task}/precision/{i}"], out[f"{task}/recall/{i}"] = p, r
        if (n + 1) % 50 == 0 or n + 1 == len(indices):
            logger.info(f"{n + 1} of this process's {len(indices)} chunks of categories evaluated "
                        f"({time.perf_counter() - start:.1f} s).")
    return out


def _chunks_process(path: str, *args, **kwargs) -> None:
    """`_evaluate_chunks` in a forked process: its arrays, or its error, to `path`."""
    code = 0
    try:
        np.savez(path, **_evaluate_chunks(*args, **kwargs))
    except BaseException:
        import traceback

        with open(path + ".error", "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)  # no atexit handlers or buffers of the parent's


def evaluate_results(gt: GroundTruth, images: Iterable[List[dict]], tasks: Sequence[str], *, max_dets: int = 300,
                     engine: str = "auto", dets_per_chunk: int = DEFAULT_DETS_PER_CHUNK,
                     pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK, img_ids: Optional[Sequence[int]] = None,
                     work_dir: Optional[str] = None, processes: int = 0) -> Dict[str, object]:
    """Evaluate a stream of per-image record lists (COCO result format, dataset category ids)
    against `gt`, chunk by chunk of categories.

    The chunks are shared out over `processes` processes (0: one per CPU, at most
    `MAX_DEFAULT_PROCESSES`; forked, where the OS forks), each evaluating every task of its chunks.
    Each forked process holds the ground truth and one chunk at a time (about 1.2 GB at LVIS val's
    size), so their number bounds the memory.

    Returns {task: summary}: for LVIS an `lvis.LVISEval` (`.results`), for COCO a pycocotools
    COCOeval (`.stats`, `.eval`), as the one-shot evaluation would leave them.
    """
    engine = resolve_engine(engine)
    img_ids = list(gt.image_ids if img_ids is None else sorted(set(img_ids)))
    folder = tempfile.mkdtemp(prefix="regionspot-eval-", dir=work_dir)
    start = time.perf_counter()
    tasks = list(tasks)
    try:
        buckets = Buckets(folder, len(gt.cat_ids))
        read = bucket_detections(gt, images, buckets, max_dets=max_dets,
                                 img_ids=None if img_ids == gt.image_ids else img_ids)
        chunks = buckets.chunks(dets_per_chunk, gt, pairs_per_chunk)
        if img_ids != gt.image_ids:
            wanted = set(img_ids)
            chunks = [(b, [i for i in ims if i in wanted]) for b, ims in chunks]
        processes = processes or min(os.cpu_count() or 1, MAX_DEFAULT_PROCESSES)
        processes = min(processes, len(chunks)) if hasattr(os, "fork") else 1
        kw = dict(max_dets=max_dets, engine=engine, start=start)
        forked = []
        if processes > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            for k in range(1, processes):
                path = os.path.join(folder, f"process{k}.npz")
                proc = ctx.Process(target=_chunks_process, daemon=True, kwargs=kw,
                                   args=(path, gt, buckets, chunks, tasks, range(k, len(chunks), processes)))
                proc.start()
                forked.append((proc, path))
        logger.info(f"Evaluating {read} detections ({sum(buckets.counts)} that count) with {engine}: "
                    f"{len(chunks)} chunks of categories over {processes} process(es); bucketed in "
                    f"{time.perf_counter() - start:.1f} s.")
        arrays = _evaluate_chunks(gt, buckets, chunks, tasks, range(0, len(chunks), processes), **kw)
        for proc, path in forked:
            proc.join()
            if proc.exitcode != 0:
                error = f"exit code {proc.exitcode}"
                if os.path.isfile(path + ".error"):
                    with open(path + ".error") as f:
                        error = f.read()
                raise RuntimeError(f"Evaluating chunks of categories failed in a forked process:\n{error}")
            with np.load(path) as f:
                arrays.update({k: f[k] for k in f.files})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {}
    for task in tasks:
        precision = np.concatenate([arrays[f"{task}/precision/{i}"] for i in range(len(chunks))], axis=2)
        recall = np.concatenate([arrays[f"{task}/recall/{i}"] for i in range(len(chunks))], axis=1)
        if gt.lvis_style:
            out[task] = lvis_summary(gt, precision, recall, task, max_dets)
        else:
            with contextlib.redirect_stdout(io.StringIO()) as buf:
                out[task] = coco_summary(gt, precision, recall, task, max_dets, img_ids)
            out[task].summary_text = buf.getvalue()
    return out
