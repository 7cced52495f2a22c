"""regionspot.visualization.draw_regions: the one drawing of every tool (tools/demo.py, tools/web_demo.py)."""
import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances

from regionspot.visualization import FOREGROUND, draw_regions, region_color


def _regions():
    image = np.full((60, 80, 3), 128, np.uint8)
    inst = Instances((60, 80))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([1])
    masks = torch.zeros(1, 60, 80, dtype=torch.bool)
    masks[0, 15:35, 15:35] = True
    inst.pred_masks = masks
    return image, inst, Metadata(name="t", thing_classes=["cat", "dog"])


def test_same_regions_same_picture_colour_by_region():
    image, inst, meta = _regions()
    a = draw_regions(image, inst, meta).get_image()
    assert np.array_equal(a, draw_regions(image, inst, meta).get_image())  # no random colours
    assert a.shape == image.shape and (a[25, 25] != image[25, 25]).any()  # the mask is drawn
    assert np.array_equal(a[55:, 60:], image[55:, 60:])  # far from the region, the image is untouched
    b = draw_regions(image, inst, meta, region_ids=[3]).get_image()
    assert not np.array_equal(a[25, 25], b[25, 25])  # region 3 has its own colour
    expected = 0.5 * image[25, 25] + 0.5 * 255 * region_color(3)  # the mask blended at alpha 0.5
    assert np.abs(b[25, 25].astype(float) - expected).max() <= 3


def test_points_are_marked():
    image, inst, meta = _regions()
    empty = inst[inst.scores > 1]
    out = draw_regions(image, empty, meta, points=np.array([[60.0, 45.0]]), point_labels=np.array([1])).get_image()
    assert np.abs(out[45, 60].astype(float) - 255 * np.array(FOREGROUND)).max() <= 3
    assert np.array_equal(out[:30, :30], image[:30, :30])
