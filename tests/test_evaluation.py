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
