"""tools/benchmark.py's measurements that could silently be wrong: FLOP counts and the pipeline."""
import json


from conftest import load_tool

benchmark = load_tool("benchmark")


def _flops(*argv, opts=()):
    args = benchmark.parse_args(["--sam", "tiny", "--clip", "tiny", "--device", "cpu", *argv])
    model = benchmark.build(args, "", extra_opts=opts)
    return benchmark.count_flops(model, benchmark.make_inputs(args, 1)[0])


def test_flop_count_sees_fused_attention_and_scales_with_boxes():
    fused = _flops("--boxes", "4")
    plain = _flops("--boxes", "4", opts=["MODEL.REGIONSPOT.SAM.FUSED_ATTENTION", "False"])
    # Fused kernels are invisible to FlopCounterMode; counting through the math kernel must see
    # the attention matmuls whichever forward the encoder uses.
    assert fused == plain
    assert all(v > 0 for v in fused.values())
    # CLIP's ViT, by hand: patch conv, then per layer QKV/out projections and a 4x MLP (24 L W^2)
    # and the two attention products (4 L^2 W), L tokens of width W. Its attention runs in
    # nn.MultiheadAttention's fused fast path, which must be counted as well.
    clip = benchmark.build(benchmark.parse_args(["--sam", "tiny", "--clip", "tiny", "--device", "cpu"]), "").clip_encoder
    visual = clip.clip_model.visual
    p, w = visual.conv1.kernel_size[0], visual.conv1.out_channels
    g = clip.input_size // p
    tokens = g * g + 1
    expected = 2 * g * g * 3 * p * p * w + visual.transformer.layers * (24 * tokens * w * w + 4 * tokens * tokens * w)
    assert fused["clip"] == expected
    # The decoder's cost is linear in the boxes (plus a once-per-image positional grid); the
    # encoders' is per image.
    eight, twelve = _flops("--boxes", "8"), _flops("--boxes", "12")
    step = eight["mask_decoder"] - fused["mask_decoder"]
    assert twelve["mask_decoder"] - eight["mask_decoder"] == step > 0.9 * fused["mask_decoder"]
    assert (twelve["sam_encoder"], twelve["clip"]) == (fused["sam_encoder"], fused["clip"])


def test_roofline_fractions_follow_from_flops_rate_and_time():
    flops = {"sam_encoder": 4e9, "mask_decoder": 1e9, "clip": 5e9}
    per_image = {"sam_encoder": 0.02, "mask_decoder": 0.01, "clip": 0.05, "total": 0.1}
    rf = benchmark.roofline(flops, per_image, rate=1e12)
    assert abs(rf["sam_encoder"]["fraction"] - 0.2) < 1e-12
    assert abs(rf["total"]["ideal_s"] - 0.01) < 1e-12
    assert abs(rf["total"]["fraction"] - 0.1) < 1e-12


def test_pipeline_times_every_image_after_warmup_and_evaluates_them_all(tmp_path):
    out = tmp_path / "bench.jsonl"
    argv = ["--sam", "tiny", "--clip", "tiny", "--device", "cpu", "--pipeline", "6", "--batch", "2",
            "--workers", "1", "--boxes", "3", "--num-classes", "7", "--image-size", "160x120",
            "--pipeline-root", str(tmp_path / "pipe"), "--evaluate", "--json", str(out)]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text().splitlines()[-1])["pipeline"]
    assert record["images_timed"] == 4  # 6 images in batches of 2, the first batch untimed
    t = record["per_image_s"]
    assert abs(t["loader_wait"] + t["model"] + t["evaluator_process"] - t["total"]) < 1e-3
    assert record["images_per_s"] * t["total"] > 0.999
    assert record["evaluate_s"] > 0
    # The evaluator saw every image (the warm-up batch included): 3 boxes x 7 classes each.
    with open(tmp_path / "pipe" / "eval" / "lvis_instances_results.json") as f:
        dets = json.load(f)
    assert sorted({d["image_id"] for d in dets}) == list(range(1, 7))
    assert len(dets) == 6 * 3 * 7


def test_pipeline_seconds_bound_the_timed_part_and_roofline_uses_its_times(tmp_path):
    args = benchmark.parse_args(["--sam", "tiny", "--clip", "tiny", "--device", "cpu", "--pipeline", "6", "--batch", "2",
                                 "--workers", "0", "--boxes", "3", "--num-classes", "5", "--image-size", "160x120",
                                 "--pipeline-root", str(tmp_path), "--pipeline-seconds", "1e-9", "--roofline"])
    out = benchmark.pipeline(args)
    assert out["images_timed"] == 2  # one batch after the warm-up, then the bound stops it
    assert out["warmup_s"] > 0
    rf, t = out["roofline"], out["per_image_s"]
    for stage in ("sam_encoder", "mask_decoder", "clip", "total"):
        assert rf[stage]["measured_s"] == t[stage]
        assert abs(rf[stage]["ideal_s"] - rf[stage]["gflop"] * 1e9 / rf["matmul_flops_per_s"]) < 1e-12


def test_lvis_eval_size_measures_both_routes_and_they_agree(tmp_path):
    out = tmp_path / "bench.jsonl"
    argv = ["--lvis-eval-size", "60", "--lvis-eval-baseline", "20,40", "--lvis-eval-dets", "30",
            "--lvis-eval-root", str(tmp_path / "sets"), "--json", str(out)]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text().splitlines()[-1])["lvis_eval"]
    assert [b["images"] for b in record["baseline"]] == [20, 40] and record["new"]["images"] == 60
    # At 20 images both routes give the lvis package's figures (the new one by chunks of categories).
    assert record["check"]["images"] == 20 and record["check"]["max_abs_diff"] < 1e-6
    assert 0 < record["new"]["metrics"]["bbox"]["AP"] < 100
    a, b = record["baseline"]
    slope = (b["seconds"] - a["seconds"]) / 20
    assert abs(record["baseline_extrapolated"]["seconds"] - (b["seconds"] + slope * 20)) < 1e-9
    assert all(r["peak_rss_gb"] > 0.1 for r in (a, b, record["new"]))
    # The set is made once: a second run finds it.
    assert (tmp_path / "sets" / "n60-d30-v0.5" / "complete").is_file()


def test_pipeline_box_masks_are_box_shaped_and_rle_is_timed_inside_the_evaluator(tmp_path):
    import numpy as np
    import pycocotools.mask as mask_util

    args = benchmark.parse_args(["--sam", "tiny", "--clip", "tiny", "--device", "cpu", "--pipeline", "3",
                                 "--workers", "0", "--boxes", "4", "--num-classes", "5", "--image-size", "200x150",
                                 "--pipeline-root", str(tmp_path), "--box-masks", "--evaluate"])
    t = benchmark.pipeline(args)["per_image_s"]
    assert 0 < t["rle"] <= t["evaluator_process"]
    with open(tmp_path / "eval" / "lvis_instances_results.json") as f:
        dets = json.load(f)
    assert dets
    for d in dets:  # each mask fills its box (up to the low-res grid's 4-pixel cells) and nothing else
        m = mask_util.decode(d["segmentation"])
        ys, xs = np.nonzero(m)
        x, y, w, h = d["bbox"]
        assert len(ys) and xs.min() >= x - 6 and xs.max() <= x + w + 6 and ys.min() >= y - 6 and ys.max() <= y + h + 6
        assert m.sum() >= 0.5 * w * h


def test_both_mask_routes_write_the_same_detections(tmp_path):
    """--mask-route dense (windowed pastes, encoded by the evaluator) and the model's run lengths
    give the same records, masks included, and both time the evaluator's RLE strings."""
    out = {}
    for route in ("runs", "dense"):
        args = benchmark.parse_args(["--sam", "tiny", "--clip", "tiny", "--device", "cpu", "--pipeline", "3",
                                     "--workers", "0", "--boxes", "6", "--num-classes", "5", "--image-size", "200x150",
                                     "--pipeline-root", str(tmp_path / route), "--box-masks", "--evaluate",
                                     "--mask-route", route])
        assert benchmark.pipeline(args)["per_image_s"]["rle"] > 0
        with open(tmp_path / route / "eval" / "lvis_instances_results.json") as f:
            out[route] = sorted(json.load(f), key=lambda d: (d["image_id"], d["category_id"], d["bbox"]))
    assert out["runs"] and out["runs"] == out["dense"]
