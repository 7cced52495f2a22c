"""Run frozen SAM over a dataset's ground-truth boxes and cache the region tokens per image."""
import logging
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from detectron2.data import DatasetCatalog
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.utils import comm
from tqdm import tqdm

from .dataset_mapper import RegionSpotDatasetMapper, warn_degenerate_annotations
from ..modeling.region_pipeline import frozen_precision, sanitize_boxes
from ..modeling.encoders.sam_encoder import SamRegionEncoder
from .token_cache import is_valid, sam_weights_id, save_tokens, source_key, token_cache_folder, token_file

logger = logging.getLogger(__name__)


@dataclass
class ExtractionSummary:
    images: int = 0      # images whose tokens were written by this run
    boxes: int = 0       # boxes in those images
    skipped: int = 0     # images already in the cache (valid files), left as they are
    failed: Dict[str, str] = field(default_factory=dict)  # file name -> reason

    def merge(self, other: "ExtractionSummary") -> "ExtractionSummary":
        return ExtractionSummary(self.images + other.images, self.boxes + other.boxes,
                                 self.skipped + other.skipped, {**self.failed, **other.failed})

    def __str__(self) -> str:
        lines = [f"images: {self.images}, boxes: {self.boxes}, skipped: {self.skipped}, failed: {len(self.failed)}"]
        lines += [f"  failed {name}: {why}" for name, why in sorted(self.failed.items())]
        return "\n".join(lines)


def shard_of(items: List, shard: int, num_shards: int, rank: int = 0, world_size: int = 1) -> List:
    """The items of job `shard` of `num_shards`, then of process `rank` of `world_size` within it."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}), got {shard}.")
    return items[shard::num_shards][rank::world_size]


@torch.no_grad()
def extract_tokens(
    sam_encoder: SamRegionEncoder,
    cfg,
    dataset_name: str,
    output_root: str,
    *,
    shard: int = 0,
    num_shards: int = 1,
    autocast: str = "",
) -> ExtractionSummary:
    """Extract and cache tokens for this process's part of `dataset_name`.

    Images with a valid cache file are skipped; a truncated, corrupt or stale (made from other
    annotations) file is redone. A failing
    image (unreadable file, bad boxes) is recorded with its reason and the run goes on.
    """
    device = next(sam_encoder.parameters()).device
    folder = token_cache_folder(output_root, dataset_name, cfg.MODEL.REGIONSPOT.SAM.TYPE)
    all_dicts = DatasetCatalog.get(dataset_name)
    warn_degenerate_annotations(all_dicts, dataset_name)
    dicts = shard_of(all_dicts, shard, num_shards, comm.get_rank(), comm.get_world_size())
    summary = ExtractionSummary()
    check = tqdm(dicts, desc=f"checking cache {dataset_name}", unit="img", disable=not comm.is_main_process(),
                 leave=False)
    sam_weights = sam_weights_id(cfg)
    pending = [(d, source_key(d, sam_weights)) for d in check]
    pending = [(d, src) for d, src in pending if not is_valid(token_file(folder, d["image_id"]), d["image_id"], src)]
    summary.skipped = len(dicts) - len(pending)
    # Decoding and mapping run in loader workers, overlapping SAM; a failure comes back as a value.
    # No test-time resize: cached boxes stay in the original image's pixels, where the training
    # mapper applies its own augmentations to them.
    mapper = _ReportingMapper(RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=dataset_name,
                                                      augmentations=[]))
    loader = torch.utils.data.DataLoader(
        MapDataset(DatasetFromList([d for d, _ in pending], copy=False, serialize=False), mapper),
        batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS, shuffle=False,
    )
    amp = frozen_precision(device, autocast)
    bar = tqdm(zip(pending, loader), total=len(pending), desc=f"SAM tokens {dataset_name}", unit="img",
               disable=not comm.is_main_process())
    for (d, source), x in bar:
        name = d.get("file_name", str(d["image_id"]))
        try:
            if "error" in x:
                raise x["error"]
            image = x["image"].to(device)
            if cfg.INPUT.FORMAT == "BGR":
                image = image.flip(0)  # SAM sees RGB
            boxes = x["instances"].gt_boxes.tensor.to(device).float().clone()
            keep = sanitize_boxes(boxes, tuple(image.shape[-2:]), f" of image {name}")
            boxes, classes = boxes[keep], x["instances"].gt_classes[keep.cpu()]
            with amp:
                pre, _ = sam_encoder.preprocess(image)
                emb = sam_encoder.encode_images(pre[None])[0]
                tokens, _ = sam_encoder.decode_boxes(emb, boxes, tuple(image.shape[-2:]), masks=False)
            save_tokens(token_file(folder, d["image_id"]), image_id=d["image_id"], file_name=name,
                        image_size=image.shape[-2:], tokens=tokens.float(), boxes=boxes, classes=classes,
                        sam_type=cfg.MODEL.REGIONSPOT.SAM.TYPE, source=source)
        except Exception as e:  # one bad image must not stop a long run; it is reported at the end
            summary.failed[name] = f"{type(e).__name__}: {e}"
            logger.warning(f"Token extraction failed for {name}: {e}")
            continue
        summary.images += 1
        summary.boxes += int(boxes.shape[0])
    return summary


class _ReportingMapper:
    """Wraps a mapper so that an exception is returned (as {"error": exc}) instead of raised:
    a loader worker that raised would end the whole run."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, d):
        try:
            return self.mapper(d)
        except Exception as e:
            return {"error": e}


def gather_summaries(summary: ExtractionSummary) -> ExtractionSummary:
    """Combine the summaries of all processes (on every process)."""
    total = ExtractionSummary()
    for s in comm.all_gather(summary):
        total = total.merge(s)
    return total
