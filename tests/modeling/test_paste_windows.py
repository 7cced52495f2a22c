"""Windowed mask pasting gives the masks of pasting the whole image, pixel for pixel.

The oracle below is the whole-image paste as it was before windows (kept here verbatim, so the
test does not compare the code with itself): SAM's or SAM 2's own upsampling for the plain paste,
one grid_sample over every output pixel for the fast one.
"""
import pytest
import torch
import torch.nn.functional as F

from regionspot.modeling.encoders.sam2_encoder import Sam2RegionEncoder, build_sam2_model
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_tiny_sam


def _oracle_paste_chunk(enc, low_res, input_size, original_size, fast):
    if not fast:
        masks = enc._upsample_logits(low_res.float(), input_size, original_size)
        return masks[:, 0] > enc.mask_threshold
    H, W = original_size
    S = float(enc.image_size)
    dev = low_res.device
    gy = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) * (input_size[0] / H) * (2.0 / S) - 1.0
    gx = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) * (input_size[1] / W) * (2.0 / S) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    grid = grid[None].expand(low_res.shape[0], H, W, 2)
    masks = F.grid_sample(low_res.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return masks[:, 0] > enc.mask_threshold


def _oracle_paste(enc, low_res, input_size, original_size, fast, chunk=16):
    if low_res.shape[0] == 0:
        return torch.zeros((0, *original_size), dtype=torch.bool, device=low_res.device)
    return torch.cat([_oracle_paste_chunk(enc, c, input_size, original_size, fast) for c in low_res.split(chunk)])


@pytest.fixture(scope="module")
def encoders():
    return {"tiny": SamRegionEncoder(build_tiny_sam()).eval(),
            "sam2_tiny": Sam2RegionEncoder(build_sam2_model("sam2_tiny")).eval()}


def _input_size(enc, size):
    if isinstance(enc, Sam2RegionEncoder):
        return (enc.image_size, enc.image_size)  # SAM 2 squashes the image to its square input
    return enc.transform.get_preprocess_shape(size[0], size[1], enc.image_size)


def _logits(n_side: int, seed: int) -> torch.Tensor:
    """Low-res logits of every kind: small and large blobs anywhere, blobs on each border and
    corner, one positive cell (corners, centre), all negative, all positive, and a cell just
    above the threshold in a sea of negatives."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.randn(10, 1, 6, 6, generator=g), n_side, mode="bicubic") * 4 - 2
    out = [blobs]
    base = torch.full((1, 1, n_side, n_side), -5.0)
    for y, x in [(0, 0), (0, n_side - 1), (n_side - 1, 0), (n_side - 1, n_side - 1), (n_side // 2, n_side // 3)]:
        one = base.clone()
        one[..., y, x] = 3.0
        out.append(one)
    for border in ((slice(None), slice(0, 2)), (slice(None), slice(n_side - 2, None)),
                   (slice(0, 1), slice(None)), (slice(n_side - 3, None), slice(None))):
        edge = base.clone()
        edge[0, 0][border] = 1.5
        out.append(edge)
    tiny = base.clone()
    tiny[..., 7, 9] = 1e-6
    out += [base.clone(), torch.full_like(base, 2.0), tiny]
    return torch.cat(out)


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("size", [(192, 256), (333, 500), (500, 333), (97, 131), (256, 256), (17, 403), (480, 640)])
def test_windowed_paste_equals_the_whole_image_paste(encoders, family, fast, size):
    enc = encoders[family]
    low = _logits(enc.image_size // 4, seed=size[0] + size[1])
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast)
    masks, windows = enc.paste_masks(low, input_size, size, fast=fast, return_windows=True)
    assert masks.shape == expected.shape == (low.shape[0], *size)
    assert expected.any() and (~expected).any()
    assert torch.equal(masks, expected)
    # Every True pixel is inside its window, and the windows are tighter than the image for
    # the small blobs (the point of them).
    for m, (y0, y1, x0, x1) in zip(expected, windows.tolist()):
        inside = torch.zeros_like(m)
        inside[y0:y1, x0:x1] = True
        assert not (m & ~inside).any()
    areas = (windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2])
    assert (areas[10:15] < size[0] * size[1] / 4).all()  # one positive cell: a small window
    assert areas[-3] == 0  # all negative: nothing sampled


@pytest.mark.parametrize("fast", [True, False])
def test_paste_in_small_pieces_gives_the_same_masks(encoders, fast, monkeypatch):
    """Bounded memory: with a sample budget below one mask's window the paste goes row band by
    row band (fast) or mask by mask (plain), with the same result."""
    enc = encoders["tiny"]
    low, size = _logits(enc.image_size // 4, seed=1), (211, 377)
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast)
    monkeypatch.setattr(enc, "paste_pixels", 1000)
    assert torch.equal(enc.paste_masks(low, input_size, size, fast=fast), expected)


def test_no_masks(encoders):
    enc = encoders["tiny"]
    masks, windows = enc.paste_masks(torch.zeros(0, 1, 64, 64), (256, 192), (40, 30), fast=True, return_windows=True)
    assert masks.shape == (0, 40, 30) and windows.shape == (0, 4)


@pytest.mark.parametrize("runs", [True, False])
def test_detections_give_detectron2s_records(synthetic_val, monkeypatch, runs):
    """Whichever way the model makes its shared masks (run lengths from the logits, or windowed
    pastes for noisy masks), the evaluator's records are detectron2's records of the dense masks."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.modeling import build_model

    from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
    from regionspot.evaluation import instances_to_json
    from regionspot.modeling.encoders.region_encoder import RegionEncoderBase
    from regionspot.structures import RunLengthMasks

    from conftest import tiny_cfg

    monkeypatch.setattr(RegionEncoderBase, "run_lengths_pay_off", lambda *a: runs)
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    for out in model([mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]):
        inst = out["instances"]
        masks = inst.pred_masks
        assert isinstance(masks.masks, RunLengthMasks) == runs and len(masks) == len(inst)
        assert runs or masks.windows is not None
        dense = inst[:]
        dense.pred_masks = masks.tensor
        assert dense.pred_masks.any()  # the check below compares real masks
        assert instances_to_json(inst, 1) == instances_to_coco_json(dense, 1)


def test_run_lengths_pay_off_for_smooth_masks_not_noise(encoders):
    """The route choice: box-shaped logits (a trained SAM's kind of mask) take the run lengths,
    cell-level noise (random weights) the paste."""
    enc = encoders["tiny"]
    size = (480, 640)
    input_size = _input_size(enc, size)
    n_side = enc.image_size // 4
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(50, 1, n_side, n_side, generator=g)
    boxes = torch.full((50, 1, n_side, n_side), -3.0)
    for i in range(50):
        y, x = torch.randint(0, n_side // 2, (2,), generator=g).tolist()
        boxes[i, 0, y: y + 8, x: x + 12] = 3.0
    for low, expected in ((boxes, True), (noise, False)):
        windows = enc.mask_windows(low, input_size, size, fast=True)
        assert enc.run_lengths_pay_off(low, input_size, size, windows) == expected


def _grid(enc, input_size, size):
    return enc._fast_grid(input_size, size, torch.device("cpu"))


def _hard_logits(n_side: int) -> torch.Tensor:
    """Logits that test the margins: exact zeros, subnormal positives, NaN and infinities inside
    masks, huge magnitudes, and ramps whose rows or columns are constant (a zero slope)."""
    base = torch.full((1, 1, n_side, n_side), -5.0)
    zeros = base.clone()
    zeros[..., 10:20, 10:20] = 0.0
    zeros[..., 12:14, 12:14] = 1.0
    tiny = base.clone()
    tiny[..., 5:9, 30:40] = 1e-38
    nan = base.clone()
    nan[..., 20:30, 20:30] = 2.0
    nan[..., 25, 25] = float("nan")
    inf = base.clone()
    inf[..., 3:8, 3:8] = float("inf")
    inf[..., 40:44, 40:44] = -float("inf")
    inf[..., 41, 10:30] = 1.0
    huge = torch.randn(1, 1, n_side, n_side, generator=torch.Generator().manual_seed(1)) * 1e4
    ramp = torch.linspace(-1, 1, n_side).view(1, 1, n_side, 1).expand(1, 1, n_side, n_side).clone()
    return torch.cat([torch.zeros_like(base), zeros, tiny, nan, inf, huge, ramp, ramp.transpose(2, 3)])


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
@pytest.mark.parametrize("size", [(192, 256), (333, 500), (500, 333), (97, 131), (17, 403), (480, 640), (1, 1),
                                  (3, 700), (700, 2), (320, 320), (160, 200), (40, 40)])
def test_run_lengths_from_logits_equal_the_paste(encoders, family, size):
    """`paste_masks_rle` finds the fast paste's runs from the low-res logits alone: they are those
    of the whole-image paste, pixel for pixel, for every kind of logits, image sizes above and
    below the map's (empty cell intervals), and sizes whose rows fall on cell boundaries."""
    from regionspot.mask_rle import bilinear_run_lengths, decode_run_lengths, run_lengths

    enc = encoders[family]
    n_side = enc.image_size // 4
    low = torch.cat([_logits(n_side, seed=size[0] + size[1]), _hard_logits(n_side)])
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast=True)
    rle = enc.paste_masks_rle(low, input_size, size)
    assert torch.equal(rle.tensor, expected)
    counts, lengths = run_lengths(expected)
    assert torch.equal(rle.counts, counts) and torch.equal(rle.lengths, lengths)
    # Whole-image windows (no help from the low-res reach) give the same runs.
    full = torch.tensor([[0, size[0], 0, size[1]]]).expand(len(low), 4)
    assert torch.equal(decode_run_lengths(*bilinear_run_lengths(low, full, *_grid(enc, input_size, size)), size),
                       expected)


def test_run_lengths_in_small_groups(encoders, monkeypatch):
    """A small work budget splits the masks into many groups; the runs stay the same."""
    import regionspot.mask_rle as mask_rle

    enc = encoders["tiny"]
    low = _logits(enc.image_size // 4, seed=3)
    size = (333, 500)
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast=True)
    monkeypatch.setattr(mask_rle, "BILINEAR_CHUNK", 500)
    assert torch.equal(enc.paste_masks_rle(low, input_size, size).tensor, expected)


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
def test_run_lengths_where_border_padding_clamps_rows(encoders, family):
    """Rows above the first cell centre (or below the last) all read one clamped coordinate. With the
    top (bottom) cell row near zero at some columns, exactly or a few float32 steps either side, and
    a steep drop to the next cell row, every clamped row gets grid_sample's sign, not just the one
    next to the crossing."""
    from regionspot.mask_rle import _cell_axis

    enc = encoders[family]
    n = enc.image_size // 4
    size = (1000, 1000)
    input_size = _input_size(enc, size)
    _, gx = _grid(enc, input_size, size)
    _, k_x, t_x = _cell_axis(gx, n)
    columns = [x for x in range(0, size[1], 7) if 0 < float(t_x[x]) < 1][::5]
    low = []
    for edge, inner in ((0, 1), (n - 1, n - 2)):
        for step in (-2, -1, 0, 1, 2):
            m = torch.full((1, 1, n, n), -100.0)
            m[0, 0, edge] = -1.0
            for x in columns:
                t = float(t_x[x])
                b = torch.tensor((1 - t) / t, dtype=torch.float32)  # (1 - t) * -1 + t * b = 0 at column x
                for _ in range(abs(step)):
                    b = torch.nextafter(b, torch.tensor(float("inf") if step > 0 else -float("inf")))
                m[0, 0, edge, int(k_x[x])], m[0, 0, edge, int(k_x[x]) + 1] = -1.0, b
            m[0, 0, inner] = -100.0
            low.append(m)
    low = torch.cat(low)
    expected = _oracle_paste(enc, low, input_size, size, fast=True)
    assert expected[:, 0].any() and expected[:, -1].any()  # some clamped rows are True, some not
    assert torch.equal(enc.paste_masks_rle(low, input_size, size).tensor, expected)


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
def test_run_lengths_of_subnormal_logits(encoders, family):
    """Masks whose largest logit is subnormal or barely normal: rounding is absolute there, and the
    runs are still grid_sample's."""
    enc = encoders[family]
    n = enc.image_size // 4
    blobs = F.interpolate(torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0)), n, mode="bicubic")
    low = torch.cat([blobs * scale for scale in (1e-44, 1e-42, 1e-40, 1e-37)])
    size = (333, 500)
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast=True)
    assert expected.any()
    assert torch.equal(enc.paste_masks_rle(low, input_size, size).tensor, expected)


def test_run_lengths_work_in_bounded_pieces(encoders, monkeypatch):
    """With a small budget, wide windows go in column bands and the pixels sampled exactly (a mask
    whose values all lie within its margin of zero: every pixel) in bounded grids; the runs are
    unchanged."""
    import regionspot.mask_rle as mask_rle

    enc = encoders["tiny"]
    n = enc.image_size // 4
    flat = torch.full((1, 1, n, n), 0.5)
    flat[0, 0, 5, 5] = 1000.0  # margin 1: every value of this mask is near zero
    low = torch.cat([flat, _logits(n, seed=7)])
    size = (600, 900)
    input_size = _input_size(enc, size)
    expected = _oracle_paste(enc, low, input_size, size, fast=True)
    budget = 2000
    monkeypatch.setattr(mask_rle, "BILINEAR_CHUNK", budget)
    blocks, grids = [], []
    group_boundaries, grid_sample = mask_rle._group_boundaries, F.grid_sample

    def record_block(logits, margin, finite, idx, first, x0, n_cols, Q, C, *rest):
        blocks.append(len(idx) * Q * C)
        return group_boundaries(logits, margin, finite, idx, first, x0, n_cols, Q, C, *rest)

    def record_grid(source, grid, **kwargs):
        grids.append(grid.shape[0] * grid.shape[2])
        return grid_sample(source, grid, **kwargs)

    monkeypatch.setattr(mask_rle, "_group_boundaries", record_block)
    monkeypatch.setattr(mask_rle.F, "grid_sample", record_grid)
    got = enc.paste_masks_rle(low, input_size, size).tensor
    monkeypatch.undo()
    assert torch.equal(got, expected)
    assert max(blocks) <= budget and sum(blocks) >= n * size[1]  # the flat mask's window alone is wider
    rows_per_interval = size[0] // n + 2
    assert len(grids) > 1 and max(grids) <= 2 * (budget + rows_per_interval)


def test_run_lengths_without_float64(encoders, monkeypatch):
    """A device without float64 (MPS) pastes and encodes instead: the same runs."""
    import regionspot.modeling.encoders.region_encoder as region_encoder

    enc = encoders["tiny"]
    low = _logits(enc.image_size // 4, seed=9)
    size = (97, 131)
    input_size = _input_size(enc, size)
    monkeypatch.setattr(region_encoder, "has_float64", lambda device: False)
    monkeypatch.setattr(region_encoder, "bilinear_run_lengths", None)  # not called
    assert torch.equal(enc.paste_masks_rle(low, input_size, size).tensor,
                       _oracle_paste(enc, low, input_size, size, fast=True))


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
def test_plain_paste_run_lengths(encoders, family):
    """The plain paste has no shortcut: its masks are pasted, then encoded."""
    enc = encoders[family]
    low = _logits(enc.image_size // 4, seed=5)
    size = (97, 131)
    input_size = _input_size(enc, size)
    rle = enc.paste_masks_rle(low, input_size, size, fast=False)
    assert torch.equal(rle.tensor, _oracle_paste(enc, low, input_size, size, fast=False))


def test_no_masks_as_run_lengths(encoders):
    rle = encoders["tiny"].paste_masks_rle(torch.zeros(0, 1, 64, 64), (256, 192), (40, 30))
    assert len(rle) == 0 and rle.tensor.shape == (0, 40, 30) and rle.to_coco() == []
