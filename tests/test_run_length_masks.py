"""RunLengthMasks behaves like the dense masks it holds, and writes pycocotools' strings."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Boxes, Instances

from regionspot.mask_rle import run_lengths
from regionspot.structures import IndexedMasks, RunLengthMasks


def _dense(n: int = 6, size=(23, 17)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(n, *size, generator=g) > 0.6
    masks[0] = False
    masks[1] = True
    return masks


def _rle(masks: torch.Tensor) -> RunLengthMasks:
    counts, lengths = run_lengths(masks)
    return RunLengthMasks(counts, lengths, tuple(masks.shape[1:]))


def test_dense_views_and_selection():
    masks = _dense()
    rle = _rle(masks)
    assert len(rle) == 6 and rle.shape == masks.shape
    assert torch.equal(rle.tensor, masks) and np.array_equal(np.asarray(rle), masks.numpy())
    for i in (0, 3, -1, np.int64(2), torch.tensor(4)):  # one mask, whatever kind of integer picks it
        assert torch.equal(rle[i], masks[i])
    assert torch.equal(torch.stack(list(rle)), masks)
    index = torch.tensor([4, 1, 4, 0])
    assert torch.equal(rle[index].tensor, masks[index])
    assert torch.equal(rle[1:5:2].tensor, masks[1:5:2])
    keep = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(rle[keep].tensor, masks[keep])
    assert torch.equal(rle.areas(), masks.flatten(1).sum(1))
    with pytest.raises(IndexError):
        rle[6]


def test_coco_strings_are_pycocotools():
    masks = _dense()
    ref = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    assert _rle(masks).to_coco() == [{"size": r["size"], "counts": r["counts"]} for r in ref]


def test_cat_and_to():
    a, b = _dense(3), _dense(4)
    both = RunLengthMasks.cat([_rle(a), _rle(b)]).to("cpu")
    assert torch.equal(both.tensor, torch.cat([a, b]))
    with pytest.raises(ValueError, match="different sizes"):
        RunLengthMasks.cat([_rle(a), _rle(_dense(2, (5, 5)))])


def test_shared_run_length_masks_in_instances():
    """In `Instances`, IndexedMasks over run lengths index, concatenate and densify like a tensor."""
    masks = _dense(3)
    index = torch.tensor([2, 0, 2, 1])
    inst = Instances((23, 17))
    inst.pred_boxes = Boxes(torch.zeros(4, 4))
    inst.pred_masks = IndexedMasks(_rle(masks), index)
    assert torch.equal(inst.pred_masks.tensor, masks[index])
    assert torch.equal(inst[1:3].pred_masks.tensor, masks[index[1:3]])
    for i in (2, np.int64(2), torch.tensor(2)):
        assert torch.equal(inst.pred_masks[i], masks[2])
    joined = Instances.cat([inst, inst[torch.tensor([3])]])
    assert torch.equal(joined.pred_masks.tensor, masks[torch.tensor([2, 0, 2, 1, 1])])
    assert np.array_equal(inst.pred_masks.cpu().numpy(), masks[index].numpy())
