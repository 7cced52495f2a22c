"""The demos' prompt lines: one region per line, items separated by ';'.

    box x0 y0 x1 y1        a box (XYXY pixels)
    fg x y  /  bg x y      a foreground / background point

e.g. "box 30 40 110 120; fg 70 80" is one region prompted by a box and a point. Clicks on a picture
write these lines (`add_click`); `parse_prompts` reads them back, and `prompt_arrays` /
`prompt_groups` turn them into `RegionSpotPredictor.predict` calls.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DemoError

CLICK_MODES = ("foreground point", "background point", "box (click two corners)")


@dataclass
class Region:
    """One region prompt: a box and/or points (x, y, label 1 foreground / 0 background)."""

    box: Optional[List[float]] = None
    points: List[Tuple[float, float, int]] = field(default_factory=list)

    def text(self) -> str:
        """The region as a line of the prompt box (box corners ordered)."""
        box = None if self.box is None else [min(self.box[0], self.box[2]), min(self.box[1], self.box[3]),
                                             max(self.box[0], self.box[2]), max(self.box[1], self.box[3])]
        items = [] if box is None else ["box " + " ".join(_fmt(v) for v in box)]
        items += [f"{'fg' if lab else 'bg'} {_fmt(x)} {_fmt(y)}" for x, y, lab in self.points]
        return "; ".join(items)


def _fmt(v: float) -> str:
    return f"{round(float(v), 2):g}"


def parse_prompts(text: str) -> List[Region]:
    """Regions from the prompt box: one per non-empty line, items 'box x0 y0 x1 y1', 'fg x y',
    'bg x y' separated by ';'. Box corners may come in any order. Raises DemoError naming the line."""
    regions = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        region = Region()
        for item in (s.strip() for s in line.split(";")):
            if not item:
                continue
            kind, *values = item.split()
            kind = kind.lower()
            expected = {"box": 4, "fg": 2, "bg": 2}.get(kind)
            try:
                nums = [float(v) for v in values]
            except ValueError:
                nums = []
            if expected is None or len(nums) != expected or not all(np.isfinite(nums)):
                raise DemoError(f"Prompt line {number}: cannot read {item!r}; write 'box x0 y0 x1 y1', "
                                "'fg x y' or 'bg x y' (pixels), items separated by ';'.")
            if kind == "box":
                if region.box is not None:
                    raise DemoError(f"Prompt line {number} has two boxes: a region has at most one box "
                                    "(put the second on its own line).")
                x0, y0, x1, y1 = nums
                region.box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
            else:
                region.points.append((nums[0], nums[1], 1 if kind == "fg" else 0))
        if region.box is not None or region.points:
            regions.append(region)
    return regions


def check_regions(regions: Sequence[Region], size: Tuple[int, int]) -> None:
    """Refuse boxes with no area inside the image and points outside it, naming the region."""
    h, w = size
    for k, r in enumerate(regions, start=1):
        if r.box is not None:
            x0, y0, x1, y1 = r.box
            if min(x1, w) - max(x0, 0) <= 0 or min(y1, h) - max(y0, 0) <= 0:
                raise DemoError(f"Region {k}: the box [{', '.join(_fmt(v) for v in r.box)}] has no area inside "
                                f"the {w}x{h} (W x H) image.")
        for x, y, _ in r.points:
            if not (0 <= x <= w and 0 <= y <= h):
                raise DemoError(f"Region {k}: the point ({_fmt(x)}, {_fmt(y)}) lies outside the {w}x{h} (W x H) image.")


def prompt_arrays(regions: Sequence[Region]) -> Dict[str, Optional[np.ndarray]]:
    """`RegionSpotPredictor.predict`'s boxes / points / point_labels for regions that all have a
    box or all have none; regions with fewer points are padded with label -1 (SAM's padding)."""
    boxes = None if regions[0].box is None else np.array([r.box for r in regions], dtype=np.float32)
    most = max(len(r.points) for r in regions)
    if most == 0:
        return {"boxes": boxes, "points": None, "point_labels": None}
    points = np.zeros((len(regions), most, 2), dtype=np.float32)
    labels = -np.ones((len(regions), most), dtype=np.float32)
    for i, r in enumerate(regions):
        for j, (x, y, lab) in enumerate(r.points):
            points[i, j], labels[i, j] = (x, y), lab
    return {"boxes": boxes, "points": points, "point_labels": labels}


def prompt_groups(regions: Sequence[Region]) -> List[List[int]]:
    """Indices of the regions classified together: those with a box, then those with points only
    (one `predict` call each, as the predictor takes boxes for all regions of a call or for none)."""
    with_box = [i for i, r in enumerate(regions) if r.box is not None]
    without = [i for i, r in enumerate(regions) if r.box is None]
    return [g for g in (with_box, without) if g]


def add_click(text: str, mode: str, pending: Optional[List[float]], x: float,
              y: float) -> Tuple[str, Optional[List[float]]]:
    """The prompt text after a click at (x, y) in `mode` (one of CLICK_MODES): a point joins the
    last region (so points refine a box, as in SAM); a box takes two clicks (`pending` holds the
    first corner) and starts a new region. Returns (text, pending corner)."""
    text = text or ""
    open_line = text.rstrip(" \t").endswith("\n")  # "New region" (or Enter) left an empty last line
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if mode == CLICK_MODES[2]:
        if pending is None:
            return text, [x, y]
        lines.append(Region(box=[pending[0], pending[1], x, y]).text())
        return "\n".join(lines), None
    item = Region(points=[(x, y, 1 if mode == CLICK_MODES[0] else 0)]).text()
    if lines and not open_line:
        lines[-1] = f"{lines[-1]}; {item}"
    else:
        lines.append(item)
    return "\n".join(lines), pending


def new_region_text(text: str) -> str:
    """The prompt text with an open last line, so that the next point starts a new region."""
    text = "\n".join(ln for ln in (text or "").splitlines() if ln.strip())
    return (text + "\n") if text else ""


def undo_last_item(text: str) -> str:
    """The prompt text without the last item of its last region (and without empty lines)."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if lines:
        items = [s.strip() for s in lines[-1].split(";") if s.strip()][:-1]
        lines[-1] = "; ".join(items)
    return "\n".join(ln for ln in lines if ln.strip())


def prompt_points(regions: Sequence[Region], pending: Optional[Sequence[float]] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(P, 2) XY and (P,) labels of every point of `regions`, and of a box's `pending` first corner
    (drawn as a foreground point), as `draw_regions` takes them."""
    points = [(x, y, lab) for r in regions for x, y, lab in r.points]
    if pending is not None:
        points.append((pending[0], pending[1], 1))
    pts = np.array([p[:2] for p in points], dtype=np.float32).reshape(-1, 2)
    labels = np.array([p[2] for p in points], dtype=np.float32)
    return pts, labels
