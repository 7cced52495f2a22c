"""instances_to_json: detectron2's COCO/LVIS result records, with shared masks encoded once."""
import pycocotools.mask as mask_util
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, Instances

from regionspot.evaluation import instances_to_json
from regionspot.structures import IndexedMasks


def test_records_equal_detectron2s_for_shared_masks_on_a_non_square_image():
    h, w, boxes, dets = 37, 53, 4, 11  # H != W: a transposed mask would not decode to the same pixels
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(boxes + 1, h, w, generator=g) > 0.6  # one mask no detection uses
    index = torch.randint(0, boxes, (dets,), generator=g)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.rand(dets, 4, generator=g) * 20 + torch.tensor([0, 0, 25, 25]))
    inst.scores = torch.rand(dets, generator=g)
    inst.pred_classes = torch.randint(0, 9, (dets,), generator=g)
    dense = inst[:]
    inst.pred_masks = IndexedMasks(masks, index)
    dense.pred_masks = masks[index]

    ours, theirs = instances_to_json(inst, 7), instances_to_coco_json(dense, 7)
    assert len(ours) == len(theirs) == dets
    for a, b, i in zip(ours, theirs, index.tolist()):
        assert a == b
        assert (mask_util.decode(a["segmentation"]) == masks[i].numpy()).all()
    # Each box's mask was encoded once: detections of the same box share one record.
    assert len({id(r["segmentation"]) for r in ours}) == len(set(index.tolist()))


def _instances(h, w, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.rand(n, 4, generator=g) * 10 + torch.tensor([0, 0, 12, 12]))
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.randint(0, 5, (n,), generator=g)
    return inst, g


def test_records_equal_detectron2s_for_plain_masks():
    """The ROI-head route gives plain boolean masks (detectron2's paste): the same records."""
    inst, g = _instances(29, 41, 6)
    inst.pred_masks = torch.rand(6, 29, 41, generator=g) > 0.5
    inst.pred_masks[0] = False
    inst.pred_masks[1] = True
    assert instances_to_json(inst, 3) == instances_to_coco_json(inst, 3)


def test_records_equal_detectron2s_for_windowed_shared_masks():
    """Shared masks with windows (False outside them) give the records of the dense masks."""
    inst, g = _instances(33, 47, 5)
    windows = torch.tensor([[0, 33, 0, 47], [3, 9, 40, 47], [0, 0, 0, 0], [10, 33, 0, 5]])
    masks = torch.zeros(4, 33, 47, dtype=torch.bool)
    for m, (y0, y1, x0, x1) in zip(masks, windows.tolist()):
        m[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g) > 0.3
    index = torch.tensor([1, 0, 1, 3, 2])
    dense = inst[:]
    dense.pred_masks = masks[index]
    inst.pred_masks = IndexedMasks(masks, index, windows)
    assert instances_to_json(inst, 5) == instances_to_coco_json(dense, 5)
    assert instances_to_json(inst[[1, 3]], 5) == instances_to_coco_json(dense[[1, 3]], 5)  # a subset of the masks


def test_soft_masks_and_no_masks_keep_detectron2s_records():
    inst, g = _instances(8, 9, 3)
    assert instances_to_json(inst, 1) == instances_to_coco_json(inst, 1)
    inst.pred_masks = torch.rand(3, 8, 9, generator=g)  # probabilities: detectron2 truncates them to uint8
    assert instances_to_json(inst, 1) == instances_to_coco_json(inst, 1)
