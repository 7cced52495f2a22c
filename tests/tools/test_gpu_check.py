"""tools/gpu_check.sh: the GPU speed check must work the first time it meets a GPU, so both of its
steps run here, the measurement as a dry run on the CPU with tiny SAM and CLIP."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT, load_tool

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
gpu_check = load_tool("gpu_check")


def _sh(*args, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env={**os.environ, **env})


def test_dry_run_measures_every_configuration_and_the_numbers_add_up(tmp_path):
    out = tmp_path / "out"
    proc = _sh("run", str(out), "--dry-run", PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    planned = gpu_check.plan(dry_run=True)
    assert [c["label"] for c in record["configs"]] == [label for label, _, _ in planned]
    assert len({label for label, _, _ in planned}) == len(gpu_check.CONFIGS)
    flops = {}
    for c, (label, _, argv) in zip(record["configs"], planned):
        assert c["status"] == "ok", c
        r = c["result"]
        images, batch = int(argv[argv.index("--pipeline") + 1]), int(argv[argv.index("--batch") + 1])
        warmup = int(argv[argv.index("--warmup") + 1])
        assert r["images_timed"] == images - warmup * batch  # all after the warm-up
        t = r["per_image_s"]
        assert r["images_per_s"] > 0 and abs(r["images_per_s"] * t["total"] - 1) < 1e-6
        assert abs(t["loader_wait"] + t["model"] + t["evaluator_process"] - t["total"]) < 1e-3 * t["total"]
        assert 0 < sum(t[k] for k in gpu_check.STAGE_NAMES) <= t["model"]
        rf = r["roofline"]
        assert 0 < rf["total"]["fraction"] < 1
        assert abs(rf["total"]["ideal_s"] - sum(rf[k]["ideal_s"] for k in ("sam_encoder", "mask_decoder", "clip"))) < 1e-9
        boxes = int(argv[argv.index("--boxes") + 1])
        flops.setdefault(boxes, {k: rf[k]["gflop"] for k in ("sam_encoder", "mask_decoder", "clip")})
        assert flops[boxes] == {k: rf[k]["gflop"] for k in ("sam_encoder", "mask_decoder", "clip")}
        # One table row and one summary line per configuration, with the JSON's figures.
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert row.split(" | ")[1] == f"{r['images_per_s']:.2f}"
        assert re.search(rf"^\[gpu_check\] {re.escape(label)}: {r['images_per_s']:.2f} img/s", proc.stdout, re.M)
        # The evaluated configuration ran the final evaluation of its detections (masks' RLE, shards,
        # fast_eval), the others did not.
        assert ("evaluate_s" in r) == ("--evaluate" in argv)
        assert row.rstrip(" |").split(" | ")[-1] == (f"{r['evaluate_s']:.1f}" if "--evaluate" in argv else "-")
    # FLOPs are counted per box count (the decoder's grow with the boxes, the encoders' do not).
    few, many = sorted(flops)
    assert flops[many]["mask_decoder"] > flops[few]["mask_decoder"] > 0
    assert flops[many]["sam_encoder"] == flops[few]["sam_encoder"] > 0
    assert record["device"] in table.splitlines()[0]
    # The TensorRT step planned its engines from the exported tiny graphs (tools/tensorrt_check.py).
    assert json.loads((out / "tensorrt" / "tensorrt.json").read_text())["status"] == "planned"


def test_a_failing_configuration_leaves_the_others_and_the_budget_skips(tmp_path, monkeypatch):
    # Batch 0 fails inside the measurement (TEST_IMS_PER_BATCH must be >= 1); the next one runs.
    monkeypatch.setattr(gpu_check, "CONFIGS", [(12, "", "", 0, 0), (12, "", "", 1, 0)])
    assert gpu_check.main([str(tmp_path / "a"), "--dry-run"]) == 1
    configs = json.loads((tmp_path / "a" / "gpu_check.json").read_text())["configs"]
    assert configs[0]["status"].startswith("failed: ValueError") and "TEST_IMS_PER_BATCH" in configs[0]["status"]
    assert configs[1]["status"] == "ok" and configs[1]["result"]["images_timed"] == 3
    # No budget: every configuration is skipped, and the files still say so.
    assert gpu_check.main([str(tmp_path / "b"), "--dry-run", "--budget", "0"]) == 1
    table = (tmp_path / "b" / "gpu_check.md").read_text()
    assert table.count("| skipped:") == 2


def test_prepare_lists_what_the_gpu_machine_lacks_and_nothing_it_has():
    proc = _sh("prepare", "--list")
    assert proc.returncode == 0, proc.stderr
    listed = {re.split("==", line.split(": ")[1])[0].lower() for line in proc.stdout.splitlines() if ": " in line}
    lacking = {"sal-detectron2", "segment-anything", "openai-clip", "lvis", "fvcore", "iopath", "yacs", "termcolor",
               "omegaconf", "hydra-core", "antlr4-python3-runtime", "ftfy", "wcwidth", "pycocotools"}
    present = {"torch", "torchvision", "opencv-python-headless", "matplotlib", "pillow", "scipy", "tqdm", "tabulate",
               "tensorboard", "cloudpickle", "portalocker", "regex", "einops", "timm"}
    assert lacking <= listed and not listed & present
    assert "cp312" in proc.stdout


def test_run_without_torch_or_the_wheels_says_what_to_do(tmp_path):
    # Stand-ins for an interpreter: one that finds torch but nothing else, one that finds nothing.
    torch_only, bare = tmp_path / "torch_only", tmp_path / "bare"
    torch_only.write_text("#!/bin/sh\ncase \"$*\" in *\"'torch'\"*) exit 0 ;; *) exit 1 ;; esac\n")
    bare.write_text("#!/bin/sh\nexit 1\n")
    for f in (torch_only, bare):
        f.chmod(0o755)
    proc = _sh("run", str(tmp_path / "out"), PYTHON=str(torch_only), GPU_WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 1
    assert "gpu_check.sh prepare" in proc.stderr and str(tmp_path / "none") in proc.stderr
    proc = _sh("run", str(tmp_path / "out"), PYTHON=str(bare))
    assert proc.returncode == 1 and "has no torch" in proc.stderr


def test_gpu_plan_covers_the_issue_and_its_image_sets_fit_every_batch():
    parsed = [(label, gpu_check.benchmark.parse_args(argv)) for label, _, argv in gpu_check.plan(dry_run=False)]
    for label, a in parsed:
        assert (a.device, a.sam, a.clip, a.clip_size, a.image_size, a.top_k) == ("cuda", "vit_b", "ViT-L/14", 224, "640x480", 300)
        assert a.roofline and not a.no_masks and a.pipeline_seconds > 0
        assert a.pipeline % a.batch == 0 and a.pipeline >= (a.warmup + 1) * a.batch, label
    # One image set per box count (images are made once per set), so the sizes must agree.
    assert len({(a.boxes, a.pipeline) for _, a in parsed}) == len({a.boxes for _, a in parsed}) == 2
    assert {a.boxes for _, a in parsed} == {12, 300}
    assert {a.autocast for _, a in parsed} == {"bf16", ""}
    assert {a.opts[1] for _, a in parsed} == {"", "default"}  # eager and compiled
    assert max(a.batch for _, a in parsed) > 1 and max(a.workers for _, a in parsed) > 1
    compiled = {a.boxes for _, a in parsed if a.opts[1]}
    assert compiled == {12, 300}
    # The 300-box path with masks, as --eval-only runs it, is measured through its final evaluation.
    evaluated = [a for _, a in parsed if a.evaluate]
    assert len(evaluated) == 1 and evaluated[0].boxes == 300 and not evaluated[0].no_masks
