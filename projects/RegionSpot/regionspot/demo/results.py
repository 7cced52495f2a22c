"""What the demos make of `RegionSpotPredictor.predict` results: `Instances` numbered by region,
the table of each region's best classes, COCO-format records, and the timings line."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances

from ..evaluation import category_ids, named_results_json
from ..predictor import RegionResults

TABLE_COLUMNS = ["region", "prompt", "rank", "class", "score"]


@dataclass
class Outcome:
    """One run's results: the regions (`Instances` with `region_ids`), and what each step took."""

    instances: Instances
    names: List[str]
    id_spec: Optional[str]
    timings: List[Tuple[str, float]]


def region_instances(res: RegionResults, region_ids: Sequence[int]) -> Instances:
    """A `predict` result as `Instances` (one per region, best class first) numbered by region."""
    inst = res.to_instances()
    inst.region_ids = torch.as_tensor(list(region_ids), dtype=torch.long)[inst.prompt_indices]
    return inst


def empty_instances(size: Tuple[int, int]) -> Instances:
    """No regions, with every field `region_instances` gives, for an image of (H, W) `size`."""
    inst = Instances(tuple(size))
    inst.pred_boxes = Boxes(torch.zeros(0, 4))
    inst.scores = torch.zeros(0)
    inst.pred_classes = torch.zeros(0, dtype=torch.long)
    inst.pred_masks = torch.zeros(0, *size, dtype=torch.bool)
    inst.topk_classes = torch.zeros(0, 1, dtype=torch.long)
    inst.topk_scores = torch.zeros(0, 1)
    inst.region_ids = torch.zeros(0, dtype=torch.long)
    return inst


def json_fields(inst: Instances) -> Instances:
    """The fields of `inst` that COCO-format records are made of."""
    out = Instances(inst.image_size)
    for name in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        out.set(name, inst.get(name))
    return out


def result_records(inst: Instances, image_id, names: Sequence[str], id_spec: Optional[str] = None,
                   ids: Optional[Sequence[int]] = None) -> List[Dict]:
    """COCO-format records of one image's detections against the vocabulary `names`, each naming its
    class; category ids are `ids`, else those of the dataset `id_spec` (`category_ids`)."""
    ids = category_ids(id_spec, len(names)) if ids is None else ids
    return named_results_json(json_fields(inst), image_id, names, ids)


def results_metadata(names: Sequence[str]) -> Metadata:
    """Metadata naming the vocabulary's classes, as `draw_regions` takes it."""
    return Metadata(name="regionspot_web_demo", thing_classes=list(names))


def table_rows(inst: Instances, names: Sequence[str], prompts: Dict[int, str]) -> List[list]:
    """Rows of the results table (`TABLE_COLUMNS`): per region its top-k classes, best first; the
    region's prompt line (`prompts`, by region number) on its first row."""
    rows = []
    for k, classes, scores in zip(inst.region_ids.tolist(), inst.topk_classes.tolist(), inst.topk_scores.tolist()):
        for rank, (c, s) in enumerate(zip(classes, scores), start=1):
            rows.append([k, prompts.get(k, "") if rank == 1 else "", rank, names[c], round(float(s), 6)])
    return rows


def encode_timing(seconds: Optional[float]) -> Tuple[str, float]:
    return ("image encoders (reused)", 0.0) if seconds is None else ("image encoders (set_image)", seconds)


def timings_line(timings: Sequence[Tuple[str, float]]) -> str:
    return "Timings: " + " · ".join(f"{name} {seconds * 1000:.0f} ms" if seconds < 1 else f"{name} {seconds:.2f} s"
                                    for name, seconds in timings) if timings else ""
