"""Pictures of RegionSpot's results, drawn with detectron2's `Visualizer`: one function for every
tool (tools/demo.py's files, tools/web_demo.py's page), so they all look the same."""
from typing import Optional, Sequence

import numpy as np
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

# detectron2's own palette (the colours Visualizer picks at random from), taken in order instead,
# so a region keeps its colour from one picture to the next.
_PALETTE = colormap(rgb=True, maximum=1)
FOREGROUND, BACKGROUND = (0.1, 0.85, 0.1), (0.95, 0.1, 0.1)  # point-prompt markers


def region_color(k: int) -> np.ndarray:
    """The colour (RGB in [0, 1]) of region number `k`."""
    return _PALETTE[k % len(_PALETTE)]


def draw_regions(
    image: np.ndarray,
    instances: Instances,
    metadata: Metadata,
    *,
    region_ids: Optional[Sequence[int]] = None,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
) -> VisImage:
    """Draw each instance's mask, box and "class score%" label on `image`, as detectron2's
    `Visualizer.draw_instance_predictions` does in `ColorMode.IMAGE` (alpha 0.5), but with a
    fixed colour per region instead of a random one.

    Args:
        image: (H, W, 3) uint8 RGB image.
        instances: `pred_boxes`, `pred_classes`, `scores` and optionally `pred_masks` (H, W) of
            the image (e.g. `RegionResults.to_instances()`).
        metadata: `thing_classes` name the classes (`RegionSpotPredictor.metadata(vocabulary)`).
        region_ids: a number per instance: its colour, and a "#k" before its label (so a picture
            can be read against a table of the regions). None = colours in instance order, no numbers.
        points: (M, 2) XY point prompts to mark (green foreground, red background, by
            `point_labels` (M,): 1 / 0), e.g. the clicks of an interactive demo.
    Returns:
        detectron2's `VisImage` (`.get_image()` for the RGB array, `.save(path)` for a file).
    """
    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    n = len(instances)
    names = metadata.get("thing_classes", None) or []
    if n:
        classes = instances.pred_classes.tolist()
        scores = instances.scores.tolist()
        labels = [f"{names[c] if c < len(names) else c} {s:.0%}" for c, s in zip(classes, scores)]
        ids = list(range(n)) if region_ids is None else [int(k) for k in region_ids]
        if region_ids is not None:
            labels = [f"#{k} {text}" for k, text in zip(ids, labels)]
        masks = None
        if instances.has("pred_masks"):
            masks = [np.asarray(m, dtype=bool) for m in instances.pred_masks.cpu().numpy()]
        vis.overlay_instances(boxes=instances.pred_boxes.tensor.cpu().numpy(), masks=masks, labels=labels,
                              assigned_colors=[region_color(k) for k in ids], alpha=0.5)
    if points is not None and len(points):
        radius = max(2.0, 0.012 * max(image.shape[:2]))
        labels = np.ones(len(points)) if point_labels is None else np.asarray(point_labels)
        for (x, y), label in zip(np.asarray(points, dtype=float), labels):
            vis.draw_circle((x, y), color=FOREGROUND if label > 0 else BACKGROUND, radius=radius)
    return vis.get_output()
