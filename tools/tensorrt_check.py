#!/usr/bin/env python
"""TensorRT engines from an exported RegionSpot folder, timed beside PyTorch (tools/gpu_check.sh's
TensorRT step).

    python tools/tensorrt_check.py OUTDIR                # on a GPU machine with TensorRT
    python tools/tensorrt_check.py OUTDIR --dry-run      # anywhere: export tiny graphs, plan only

It exports SAM ViT-B + CLIP ViT-L/14 with random weights (or uses --folder), then builds one fp16
engine per graph with the tensorrt Python package. The region graph's box axis and class axis
are dynamic: the region decoder's and head's engines have two optimisation profiles, tuned for 12
and for 300 boxes, each admitting 1..MAX_BOXES boxes (and the head 1..MAX_CLASSES classes); the
text graph's prompt axis likewise.
Each engine is timed at the profile's tuned shapes and written to OUTDIR/tensorrt.json and .md,
beside PyTorch eager on the same GPU (tools/benchmark_onnx.py's stages). The plan (the profiles,
and the equivalent trtexec command lines) is always written to OUTDIR/tensorrt_plan.json; with
--dry-run, or where TensorRT is not installed, nothing is built and the step says so.
"""
import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BOXES, MAX_CLASSES, MAX_POINTS, MAX_PROMPTS = 1000, 4096, 8, 256
TUNED_BOXES = (12, 300)
TUNED_CLASSES = 1203  # LVIS
TUNED_PROMPTS = 81  # one class through the 81-template ensemble


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true", help="export the tiny test model and only plan the engines")
    p.add_argument("--folder", default="", help="an exported folder to use instead of exporting one")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=0, help="accepted for tools/gpu_check.sh; unused")
    return p


def _shape(dims) -> List[int]:
    return [int(d) for d in dims]


def profiles(manifest: Dict) -> Dict[str, List[Dict[str, Dict[str, List[int]]]]]:
    """Per graph, its optimisation profiles: {input: {"min", "opt", "max": shape}} for each dynamic
    input (fixed-shape graphs have none). A box prompt is 2 corner points (SAM 2 adds a padding
    point inside its graph), so the point axis is tuned at 2."""
    d = manifest["clip"]["text_dim"]
    out = {"sam_image": [], "clip_image": []}

    c = manifest["sam"].get("token_dim", 256)

    def decoder(boxes: int) -> Dict[str, Dict[str, List[int]]]:
        axes = {"point_coords": lambda n, p: [n, p, 2], "point_labels": lambda n, p: [n, p]}
        return {name: {"min": f(1, 1), "opt": f(boxes, 2), "max": f(MAX_BOXES, MAX_POINTS)} for name, f in axes.items()}

    def head(boxes: int) -> Dict[str, Dict[str, List[int]]]:
        return {"region_tokens": {"min": [1, c], "opt": [boxes, c], "max": [MAX_BOXES, c]},
                "text_embeddings": {"min": [1, d], "opt": [TUNED_CLASSES, d], "max": [MAX_CLASSES, d]}}

    out["region_decoder"] = [decoder(n) for n in TUNED_BOXES]
    out["region_head"] = [head(n) for n in TUNED_BOXES]
    if "text" in manifest["graphs"]:
        ctx = manifest["text"]["context_length"]
        out["text"] = [{"tokens": {"min": [1, ctx], "opt": [TUNED_PROMPTS, ctx], "max": [MAX_PROMPTS, ctx]}}]
    return out


def trtexec_command(onnx: str, engine: str, profile: Dict[str, Dict[str, List[int]]]) -> List[str]:
    """The trtexec line building the same fp16 engine with one profile (for users of trtexec)."""
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", "--fp16"]
    for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        if profile:
            cmd.append(f"{flag}=" + ",".join(f"{n}:{'x'.join(map(str, s[key]))}" for n, s in profile.items()))
    return cmd


def plan(folder: str, engines: str) -> List[Dict]:
    from regionspot_deploy.manifest import load_manifest

    manifest = load_manifest(folder)
    out = []
    for graph, profs in profiles(manifest).items():
        onnx = os.path.join(folder, manifest["graphs"][graph])
        for i, prof in enumerate(profs or [{}]):
            engine = os.path.join(engines, f"{graph}.fp16.engine")
            out.append({"graph": graph, "onnx": onnx, "engine": engine, "profile_index": i, "profile": prof,
                        "trtexec": trtexec_command(onnx, engine.replace(".engine", f".p{i}.engine") if len(profs) > 1
                                                   else engine, prof)})
    return out


def build_engine(trt, onnx: str, engine_path: str, profs: List[Dict]) -> float:
    """Build and save one fp16 engine with all of the graph's profiles; returns the build seconds."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    for prof in profs:
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx}.")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    return time.perf_counter() - t


def time_engine(trt, torch, engine_path: str, profile_index: int, shapes: Dict[str, List[int]], repeats: int) -> float:
    """Median seconds of one execution at `shapes` (inputs random on the GPU), after a warm-up."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(engine_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    context.set_optimization_profile_async(profile_index, stream.cuda_stream)
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = shapes.get(name) or list(engine.get_tensor_shape(name))
            context.set_input_shape(name, shape)
            dtype = torch.int64 if engine.get_tensor_dtype(name) == trt.DataType.INT64 else torch.float32
            buffers[name] = (torch.randint(0, 100, shape, device="cuda", dtype=dtype) if dtype == torch.int64
                             else torch.rand(shape, device="cuda", dtype=dtype))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            buffers[name] = torch.empty(list(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(name, buffers[name].data_ptr())
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        if r:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def export_default(outdir: str, dry_run: bool) -> str:
    """Export SAM ViT-B + CLIP ViT-L/14 (random weights), or the tiny model for a dry run."""
    import torch
    from detectron2.modeling import build_model

    from regionspot.config import get_regionspot_cfg
    from regionspot.modeling.region_pipeline import find_pipeline
    from regionspot.onnx_export import export_folder

    folder = os.path.join(outdir, "onnx")
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    if dry_run:
        cfg = get_regionspot_cfg(os.path.join(ROOT, "configs", "quickstart", "RegionSpot-tiny-random_synthetic.yaml"))
    else:
        cfg = get_regionspot_cfg(os.path.join(ROOT, "configs", "Base-RegionSpot.yaml"))
        c = cfg.MODEL.REGIONSPOT
        c.SAM.TYPE, c.SAM.CHECKPOINT, c.CLIP.NAME, c.CLIP.CHECKPOINT = "vit_b", "random", "ViT-L/14", "random"
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    export_folder(find_pipeline(build_model(cfg).eval()), cfg, folder)
    return folder


def find_tensorrt():
    try:
        import tensorrt  # noqa: F401

        return tensorrt
    except ImportError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    folder = args.folder or export_default(args.outdir, args.dry_run)
    engines = os.path.join(args.outdir, "engines")
    steps = plan(folder, engines)
    record = {"folder": folder, "plan": steps, "status": "planned", "results": []}
    trt = None if args.dry_run else find_tensorrt()
    if not args.dry_run and trt is None:
        record["status"] = ("skipped: TensorRT is not installed (no tensorrt module; pip install tensorrt, or run "
                            "the trtexec lines of tensorrt_plan.json)")
    for s in steps:
        print("[tensorrt] " + " ".join(s["trtexec"]), flush=True)
    if trt is not None:
        import torch

        os.makedirs(engines, exist_ok=True)
        by_graph: Dict[str, List[Dict]] = {}
        for s in steps:
            by_graph.setdefault(s["graph"], []).append(s)
        for graph, ss in by_graph.items():
            try:
                built = build_engine(trt, ss[0]["onnx"], ss[0]["engine"], [s["profile"] for s in ss if s["profile"]])
                for s in ss:
                    shapes = {n: v["opt"] for n, v in s["profile"].items()}
                    seconds = time_engine(trt, torch, s["engine"], s["profile_index"], shapes, args.repeats)
                    record["results"].append({"graph": graph, "profile": s["profile_index"], "shapes": shapes,
                                              "build_s": built, "seconds": seconds})
                    print(f"[tensorrt] {graph} profile {s['profile_index']}: {seconds * 1000:.2f} ms", flush=True)
            except Exception as e:  # one graph failing leaves the others
                record["results"].append({"graph": graph, "error": f"{type(e).__name__}: {e}"})
                print(f"[tensorrt] {graph}: failed: {e}", flush=True)
        record["status"] = "built"
        record["pytorch"] = pytorch_beside(args)
    with open(os.path.join(args.outdir, "tensorrt_plan.json"), "w") as f:
        json.dump(steps, f, indent=1)
    with open(os.path.join(args.outdir, "tensorrt.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.outdir, "tensorrt.md"), "w") as f:
        f.write(markdown(record))
    print(f"[tensorrt] {record['status']}; wrote {args.outdir}/tensorrt.json, tensorrt.md, tensorrt_plan.json")
    return 0


def pytorch_beside(args) -> Dict:
    """PyTorch eager on the GPU, the same stages (tools/benchmark_onnx.py), for the table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_onnx", os.path.join(ROOT, "tools", "benchmark_onnx.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.get_parser().parse_args(["--device", "cuda", "--repeats", "5", "--boxes", *map(str, TUNED_BOXES)])
    cfg = bench.make_cfg(a, a.sam, a.clip_backend, a.clip, a.clip_size, ["INPUT.MIN_SIZE_TEST", "0", "MODEL.DEVICE", "cuda"])
    model, _, _ = bench.build(cfg, a.num_classes)
    image = bench.make_image(a.image_size)
    boxes = {n: bench.make_boxes(n, image) for n in TUNED_BOXES}
    stages = bench.torch_stages(model, image, boxes, [f"a photo of a class {i}." for i in range(TUNED_PROMPTS)])
    return {stage: bench.timed(fn, 5) for stage, fn in stages.items()}


def markdown(record: Dict) -> str:
    lines = [f"# TensorRT fp16 engines ({record['status']})", "", "| graph | profile | shapes | ms |", "|---|---|---|---|"]
    for r in record["results"]:
        if "error" in r:
            lines.append(f"| {r['graph']} | - | - | failed: {r['error']} |")
        else:
            shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["shapes"].items()) or "fixed"
            lines.append(f"| {r['graph']} | {r['profile']} | {shapes} | {r['seconds'] * 1000:.2f} |")
    if record.get("pytorch"):
        lines += ["", "PyTorch eager, same GPU (ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in record["pytorch"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "projects", "RegionSpot"))
    sys.exit(main())
