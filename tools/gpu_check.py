#!/usr/bin/env python
"""The measurement of `tools/gpu_check.sh run`: the `--eval-only` path at 12 and 300 boxes.

    python tools/gpu_check.py OUTDIR [--dry-run] [--budget SECONDS]

Each configuration of CONFIGS runs through tools/benchmark.py's --pipeline (test loader workers,
model, the evaluator's per-image work: RLE of the kept masks and the results shards) with
--roofline, those of EVALUATED also with --evaluate (the final evaluation of their detections), in this one process so that imports, synthetic
images, FLOP counts and matmul rates are paid once. Configurations run most important first, each
in its own try, and are skipped once the time budget (default 420 s on a GPU) cannot hold them;
OUTDIR/gpu_check.json and OUTDIR/gpu_check.md are rewritten after every one, so a failure or a kill
keeps what was measured. --dry-run runs the same list on the CPU with tiny SAM and CLIP and a few
small images; its work is bounded by those (4 images per configuration), so it has no time budget
unless --budget gives one: a slow or busy machine takes longer, it does not fail.
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback

import torch

spec = importlib.util.spec_from_file_location("regionspot_tool_benchmark",
                                              os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py"))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

# (boxes, autocast, compile mode, TEST_IMS_PER_BATCH, loader workers), most important first. Both
# compiled ones use batch 8, so the second finds the encoders' kernels in inductor's on-disk cache.
CONFIGS = [
    (12, "bf16", "", 1, 4),
    (12, "bf16", "", 8, 8),
    (300, "bf16", "", 1, 4),
    (300, "bf16", "", 8, 8),
    (12, "bf16", "default", 8, 8),
    (300, "bf16", "default", 8, 8),
    (12, "", "", 8, 8),
]
GPU_BUDGET_S = 420  # seconds for all configurations on a GPU, by default
# Configurations that also run the final evaluation of their detections (benchmark --evaluate):
# the 300-box path with masks as an --eval-only run has it, the masks' run lengths found on the
# device from box-shaped low-res logits (--box-masks: like a trained SAM's masks; random weights
# give noise), the evaluator's per-image time, then the results shards evaluated by fast_eval.
EVALUATED = {(300, "bf16", "", 8, 8)}
# Seconds a configuration is expected to need on an H200 (build, warm-up, timed part); one that
# does not fit in the budget left is skipped rather than cut short.
NEEDS_S = {"": 45, "default": 150}
GPU = dict(sam="vit_b", clip="ViT-L/14", image_size="640x480", num_classes=1203, seconds=12,
           boxes={12: 12, 300: 300}, images={12: 480, 300: 160})  # images: multiples of every batch size
# The dry run: 3 and 8 boxes stand for 12 and 300 (the tiny decoder is slow per box on a CPU).
DRY = dict(sam="tiny", clip="tiny", image_size="160x120", num_classes=8, seconds=0,
           boxes={12: 3, 300: 8}, images={12: 4, 300: 4})
STAGE_NAMES = {"sam_encoder": "SAM enc", "mask_decoder": "decoder", "clip": "CLIP", "head": "head", "masks": "masks"}


def plan(dry_run: bool):
    """(label, compile mode, benchmark argv) per configuration. The dry run caps batch and workers to
    fit 4 images and a 2-core machine, warms up on one batch, and disables compilation (a tiny
    compile costs minutes of CPU; the compiled model is tested in tests/test_compile.py). On the
    GPU, compiled configurations warm up on two batches: the second may recompile for dynamic shapes."""
    s = DRY if dry_run else GPU
    out = []
    for boxes, autocast, compile_mode, batch, workers in CONFIGS:
        boxes_key, batch_key, workers_key = boxes, batch, workers
        images, boxes = s["images"][boxes], s["boxes"][boxes]
        if dry_run:
            batch, workers = min(batch, 2), min(workers, 1)
        label = (f"{boxes} boxes, {autocast or 'fp32'}, {'compiled' if compile_mode else 'eager'}, "
                 f"batch {batch}, {workers} workers"
                 + (", evaluated, box-shaped masks" if (boxes_key, autocast, compile_mode, batch_key, workers_key)
                    in EVALUATED else ""))
        argv = ["--sam", s["sam"], "--clip", s["clip"], "--clip-size", "224", "--image-size", s["image_size"],
                "--num-classes", str(s["num_classes"]), "--top-k", "300", "--boxes", str(boxes),
                "--pipeline", str(images), "--batch", str(batch), "--workers", str(workers),
                "--warmup", "2" if compile_mode and not dry_run else "1", "--pipeline-seconds", str(s["seconds"]),
                "--roofline", "--autocast", autocast, "--device", "cpu" if dry_run else "cuda",
                *(["--evaluate", "--box-masks"] if (boxes_key, autocast, compile_mode, batch_key, workers_key) in EVALUATED
                  else []),
                "--opts", "MODEL.REGIONSPOT.COMPILE", compile_mode]
        out.append((label, compile_mode, argv))
    return out


def summary(label: str, entry: dict) -> str:
    if entry["status"] != "ok":
        return f"[gpu_check] {label}: {entry['status']}"
    r = entry["result"]
    t = {k: v * 1000 for k, v in r["per_image_s"].items()}
    stages = ", ".join(f"{STAGE_NAMES[k]} {t[k]:.1f}" for k in STAGE_NAMES)
    return (f"[gpu_check] {label}: {r['images_per_s']:.2f} img/s; ms/img: {stages}, loader wait "
            f"{t['loader_wait']:.1f}, evaluator {t['evaluator_process']:.1f}, total {t['total']:.1f}; "
            f"{r['roofline']['total']['fraction'] * 100:.1f}% of the roofline; warm-up {r['warmup_s']:.1f} s, "
            + (f"final evaluation {r['evaluate_s']:.1f} s, " if "evaluate_s" in r else "")
            + f"{entry['wall_s']:.0f} s in all")


def markdown(record: dict) -> str:
    head = ["configuration", "img/s", *(f"{n} ms" for n in STAGE_NAMES.values()), "model rest ms", "loader wait ms",
            "evaluator ms", "total ms", "roofline: SAM enc / decoder / CLIP / end to end", "warm-up s", "peak GB",
            "final evaluation s"]
    lines = [f"Device: {record['device']}; torch {record['torch']}; {record['setup']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in record["configs"]:
        if c["status"] != "ok":
            lines.append(f"| {c['label']} | {c['status']} |" + " |" * (len(head) - 2))
            continue
        r = c["result"]
        t = {k: v * 1000 for k, v in r["per_image_s"].items()}
        rest = t["model"] - sum(t[k] for k in STAGE_NAMES)
        share = " / ".join(f"{r['roofline'][k]['fraction'] * 100:.1f}%" for k in ("sam_encoder", "mask_decoder", "clip", "total"))
        cells = [c["label"], f"{r['images_per_s']:.2f}", *(f"{t[k]:.1f}" for k in STAGE_NAMES), f"{rest:.1f}",
                 f"{t['loader_wait']:.1f}", f"{t['evaluator_process']:.1f}", f"{t['total']:.1f}", share,
                 f"{r['warmup_s']:.1f}", f"{r['peak_gb']:.2f}",
                 f"{r['evaluate_s']:.1f}" if "evaluate_s" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _out_of_time(signum, frame):
    raise TimeoutError("the time budget ran out during this configuration")


def measure(bench_argv, root: str, seconds_left: float = math.inf) -> dict:
    """One configuration through benchmark.pipeline, stopped by SIGALRM when the budget runs out
    (never, with no budget)."""
    if math.isfinite(seconds_left):
        signal.setitimer(signal.ITIMER_REAL, seconds_left)
    try:
        result = benchmark.pipeline(benchmark.parse_args(["--pipeline-root", root, *bench_argv]))  # --opts last
        return {"status": "ok", "result": result}
    except (Exception, SystemExit) as e:  # keep going: the other configurations still count
        traceback.print_exc()
        first_line = str(e).splitlines()[0] if str(e) else ""
        return {"status": f"failed: {type(e).__name__}: {first_line}".replace("|", "/")}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        torch._dynamo.reset()  # a fresh compilation per configuration, within dynamo's recompile limit
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny SAM and CLIP, 4 small images per set")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all configurations together (default: {GPU_BUDGET_S} on a GPU; none with "
                        "--dry-run, whose work is bounded by its few small images)")
    args = p.parse_args(argv)
    budget = args.budget if args.budget is not None else (math.inf if args.dry_run else GPU_BUDGET_S)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to exercise the script on the CPU.")
    os.makedirs(args.outdir, exist_ok=True)
    start = time.monotonic()
    s = DRY if args.dry_run else GPU
    record = {"device": benchmark.describe(benchmark.parse_args(["--device", "cpu" if args.dry_run else "cuda"])),
              "torch": f"{torch.__version__} (CUDA {torch.version.cuda})", "budget_s": budget if math.isfinite(budget) else None, "configs": [],
              "setup": f"SAM {s['sam']} + CLIP {s['clip']}@224, {s['image_size']} JPEGs, {s['num_classes']} classes, "
                       "top-300, masks on; " + (f"{s['seconds']} s timed per configuration" if s["seconds"] else "all images timed")}
    previous_handler = signal.signal(signal.SIGALRM, _out_of_time)
    try:
        no_compile = torch._dynamo.config.patch(disable=True) if args.dry_run else contextlib.nullcontext()
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as root, no_compile:
            for label, compile_mode, bench_argv in plan(args.dry_run):
                t0 = time.monotonic()
                left = start + budget - t0
                if left < (1 if args.dry_run else NEEDS_S[compile_mode]):
                    entry = {"status": f"skipped: {left:.0f} s of the budget left"}
                else:
                    entry = measure(bench_argv, root, left)
                entry.update(label=label, argv=bench_argv, wall_s=time.monotonic() - t0)
                record["configs"].append(entry)
                record["elapsed_s"] = time.monotonic() - start
                write(os.path.join(args.outdir, "gpu_check.json"), json.dumps(record, indent=1))
                write(os.path.join(args.outdir, "gpu_check.md"), markdown(record))
                print(summary(label, entry), flush=True)
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
    ok = sum(c["status"] == "ok" for c in record["configs"])
    print(f"[gpu_check] {ok}/{len(record['configs'])} configurations in {record['elapsed_s']:.0f} s; results in "
          f"{os.path.join(args.outdir, 'gpu_check.json')} and gpu_check.md", flush=True)
    return 0 if ok == len(record["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
