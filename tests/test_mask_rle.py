"""RLE of masks on their device: the bytes of pycocotools.mask.encode, for every kind of shape."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from regionspot.mask_rle import compress_counts, encode_masks, run_lengths


def _reference(masks: torch.Tensor):
    return mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


def _shapes(h: int, w: int) -> torch.Tensor:
    """Empty, full, one pixel at each corner and the centre, a stripe on each border, a box, a
    checkerboard (a run per pixel) and random masks, all (h, w)."""
    g = torch.Generator().manual_seed(h * 1000 + w)
    out = [torch.zeros(h, w, dtype=torch.bool), torch.ones(h, w, dtype=torch.bool)]
    for y, x in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]:
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y, x] = True
        out.append(m)
    for border in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        m = torch.zeros(h, w, dtype=torch.bool)
        m[border] = True
        out += [m, ~m]
    m = torch.zeros(h, w, dtype=torch.bool)
    m[h // 4: h // 4 + max(h // 2, 1), w // 3: w // 3 + max(w // 3, 1)] = True
    out += [m, ~m]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out.append((yy + xx) % 2 == 0)
    out += [torch.rand(h, w, generator=g) > p for p in (0.1, 0.5, 0.9)]
    return torch.stack(out)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 1), (2, 2), (3, 5), (31, 17), (64, 48), (480, 640),
                                  (97, 131), (1, 300), (300, 1)])
@pytest.mark.parametrize("route", ["tensor", "host"])
def test_encode_masks_gives_pycocotools_bytes(size, route):
    masks = _shapes(*size)
    ours, ref = encode_masks(masks, route=route), _reference(masks)
    assert len(ours) == len(ref) == masks.shape[0]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a["size"] == list(b["size"]) == list(size), i
        assert a["counts"] == b["counts"], (i, a["counts"][:40], b["counts"][:40])


def test_run_lengths_sum_to_the_image_and_start_with_zeros():
    masks = _shapes(31, 17)
    counts, lengths = run_lengths(masks)
    assert int(lengths.sum()) == counts.numel()
    for c in counts.split(lengths.tolist()):
        assert int(c.sum()) == 31 * 17
    full = counts.split(lengths.tolist())[1]
    assert full.tolist() == [0, 31 * 17]  # a full mask: no zeros first, then all ones


@pytest.mark.parametrize("route", ["tensor", "host"])
def test_windows_read_only_their_columns_and_give_the_same_bytes(route):
    """A mask False outside its window encodes the same from the window alone; the window's
    columns may touch either border and be of any width, including none."""
    h, w = 37, 53
    g = torch.Generator().manual_seed(3)
    windows = torch.tensor([[0, 37, 0, 53], [5, 20, 0, 7], [0, 37, 46, 53], [10, 11, 20, 21], [3, 3, 9, 9],
                            [0, 1, 0, 53], [36, 37, 0, 1], [2, 30, 10, 40]])
    masks = torch.zeros(len(windows), h, w, dtype=torch.bool)
    for m, (y0, y1, x0, x1) in zip(masks, windows.tolist()):
        m[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g) > 0.4
    masks[3, 10, 20] = True
    ref = _reference(masks)
    assert [r["counts"] for r in encode_masks(masks, windows, route)] == [r["counts"] for r in ref]
    for i in range(len(masks)):  # alone, a mask's own window is all that is read
        assert encode_masks(masks[i:i + 1], windows[i:i + 1], route)[0]["counts"] == ref[i]["counts"]


def test_large_batches_are_encoded_in_bounded_chunks(monkeypatch):
    import regionspot.mask_rle as mask_rle

    monkeypatch.setattr(mask_rle, "CHUNK_PIXELS", 500)  # several chunks, one mask alone above it
    masks = _shapes(23, 29)
    assert [r["counts"] for r in encode_masks(masks, route="tensor")] == [r["counts"] for r in _reference(masks)]


def test_many_masks_with_windows_on_the_host():
    """More masks than one pycocotools call takes, windows of every width and place."""
    g = torch.Generator().manual_seed(5)
    h, w, n = 19, 41, 150
    x0 = torch.randint(0, w, (n,), generator=g)
    x1 = (x0 + torch.randint(0, w, (n,), generator=g)).clamp(max=w)
    windows = torch.stack([torch.zeros(n, dtype=torch.long), torch.full((n,), h), x0, x1], dim=1)
    cols = torch.arange(w)
    inside = (cols >= x0[:, None]) & (cols < x1[:, None])
    masks = (torch.rand(n, h, w, generator=g) > 0.5) & inside[:, None, :]
    assert [r["counts"] for r in encode_masks(masks, windows)] == [r["counts"] for r in _reference(masks)]


def test_large_counts_and_negative_differences():
    """Counts far above 2**5 groups and differences that go negative (the sign-aware groups)."""
    counts = np.array([0, 70000, 3, 1, 2 ** 31 - 5, 7, 1, 1], dtype=np.int64)
    lengths = np.array([3, 5])
    ref = [mask_util.frPyObjects({"counts": counts[:3].tolist(), "size": [1, 70003]}, 1, 70003)["counts"],
           mask_util.frPyObjects({"counts": counts[3:].tolist(), "size": [1, 2 ** 31 + 4]}, 1, 2 ** 31 + 4)["counts"]]
    assert compress_counts(counts, lengths) == ref


def test_empty_and_bad_input():
    assert encode_masks(torch.zeros(0, 4, 5, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_masks(torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="route"):
        encode_masks(torch.zeros(1, 4, 5, dtype=torch.bool), route="gpu")
    with pytest.raises(ValueError, match="lengths"):
        compress_counts(np.array([1, 2]), np.array([1, 0]))
