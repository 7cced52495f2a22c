#!/usr/bin/env python
"""RegionSpot web demo: click a point or draw a box on your image, type any vocabulary, and see
each region's mask and name.

    python tools/web_demo.py                      # the offline tiny model, on http://127.0.0.1:7860
    python tools/web_demo.py --config-file RegionSpot-BL.yaml --weights regionspot_bl.pth

A Gradio page on RegionSpotPredictor: the image encoders run once per image (`set_image`); new
prompts or a new vocabulary reuse those features, and text embeddings are cached, so a vocabulary
seen before costs nothing. Pictures are drawn as tools/demo.py draws them
(`regionspot.visualization.draw_regions`), and the JSON is the same COCO format.

Region prompts, one region per line, items separated by ';' (clicks on the image write them):
    box x0 y0 x1 y1        a box (XYXY pixels)
    fg x y  /  bg x y      a foreground / background point
e.g. "box 30 40 110 120; fg 70 80" is one region prompted by a box and a point. "Segment everything"
fills the lines with the boxes of SAM's automatic masks (MODEL.REGIONSPOT.SAM_AUTO.*).

Vocabulary: class names separated by commas, with synonyms as "name | synonym"; or one of lvis,
coco, custom (MODEL.REGIONSPOT.CUSTOM_VOCABULARY), a registered dataset, a text-embedding file
(.pth), or a file of names.

The server binds 127.0.0.1 unless --host says otherwise; --share (a public gradio.live link) is off
unless asked for; Gradio's analytics are off. It never opens a server path a visitor typed, unless
it lies under an --allow-paths folder (links resolved): files come by upload. The Model panel is
off unless --allow-model-change, and then loads shipped configs, and configs and checkpoints from
those folders only (see docs/SECURITY.md). The temporary folder goes on exit, Ctrl-C and SIGTERM. Exit code 2 for bad options or a model that cannot
be loaded at start; later problems (unreadable image, empty vocabulary, a box outside the image, a
missing checkpoint in the Model panel) are messages in the page.
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import atexit
import hashlib
import html
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import numpy as np  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from PIL import Image  # noqa: E402

from regionspot.config import get_regionspot_cfg  # noqa: E402
from regionspot.data.images import read_image  # noqa: E402
from regionspot.deploy import OnnxPredictorAdapter  # noqa: E402
from regionspot.data.prompt_files import image_id_of  # noqa: E402
from regionspot.demo.access import MODEL_CHANGE_OFF, PageAccess  # noqa: E402
from regionspot.demo.errors import DemoError  # noqa: E402
from regionspot.demo.examples import synthetic_examples  # noqa: E402
from regionspot.demo.prompt_lines import (  # noqa: E402
    CLICK_MODES, Region, add_click, check_regions, new_region_text, parse_prompts, prompt_arrays, prompt_groups,
    prompt_points, undo_last_item)
from regionspot.demo.results import (  # noqa: E402
    TABLE_COLUMNS, Outcome, empty_instances, encode_timing, region_instances, result_records, results_metadata,
    table_rows, timings_line)
from regionspot.demo.vocabulary_text import vocabulary_from_text  # noqa: E402
from regionspot.modeling.encoders.region_encoder import SAM_AUTO_EMPTY_HINT  # noqa: E402
from regionspot.predictor import RegionSpotPredictor  # noqa: E402
from regionspot.utils.extras import require_extra  # noqa: E402
from regionspot.utils.file_io import atomic_write_bytes  # noqa: E402
from regionspot.visualization import draw_regions  # noqa: E402

gr = require_extra("gradio", "web", "The web demo (tools/web_demo.py)")
import pandas as pd  # noqa: E402  (a dependency of gradio)

logger = logging.getLogger("regionspot.web_demo")
DEFAULT_CONFIG = "quickstart/RegionSpot-tiny_synthetic.yaml"  # a model-zoo name: works from any directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------- the demo
def default_weights(cfg) -> str:
    """MODEL.WEIGHTS, else the head that training writes for this config (OUTPUT_DIR/model_final.pth,
    e.g. the quickstart's output/quickstart/model_final.pth) if it exists, else "" (random head)."""
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    for base in (os.getcwd(), ROOT):
        path = os.path.join(base, cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(path):
            return os.path.relpath(path) if base == os.getcwd() else path
    return ""


class WebDemo:
    """The page's work, on one `RegionSpotPredictor` shared by all visitors (one at a time)."""

    def __init__(self, config_file: str = DEFAULT_CONFIG, weights: Optional[str] = None,
                 opts: Sequence[str] = (), top_k: int = 3, allow_paths: Sequence[str] = (),
                 allow_model_change: bool = False, onnx: str = ""):
        """`onnx`: an exported folder (tools/export_onnx.py) to serve on onnxruntime instead of the
        config's model (`regionspot.deploy.OnnxPredictorAdapter`)."""
        self.lock = threading.RLock()
        self.top_k = top_k
        self.onnx = onnx
        self.output_dir = tempfile.mkdtemp(prefix="regionspot_web_")
        atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)
        self.predictor: Optional[RegionSpotPredictor] = None
        self.load_model(config_file, weights, opts)
        # What visitors may make the server open (checked in the server for every request).
        self.access = PageAccess(allow_paths, allow_model_change, self.config_file, self.cfg.MODEL.WEIGHTS)

    # ------------------------------------------------------------------ model
    def load_model(self, config_file: str, weights: Optional[str] = None, opts: Sequence[str] = ()) -> str:
        """Build the predictor (the previous one stays on failure); returns a line describing it."""
        try:
            if self.onnx:
                predictor = OnnxPredictorAdapter(self.onnx, top_k=self.top_k)
                cfg = get_regionspot_cfg()  # the exported model's config, as the manifest records it
                cfg.merge_from_other_cfg(cfg.load_cfg(predictor.onnx.manifest["config"]))
                config_file = f"{self.onnx} (exported)"
            else:
                cfg = get_regionspot_cfg(config_file or DEFAULT_CONFIG, list(opts))
                cfg.MODEL.WEIGHTS = default_weights(cfg) if weights is None else weights
                predictor = RegionSpotPredictor(cfg, top_k=self.top_k)
            cfg.freeze()
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
            raise DemoError(f"Cannot load the model of {self.onnx or config_file or DEFAULT_CONFIG}: {e}") from e
        with self.lock:
            self.predictor, self.cfg = predictor, cfg
            self.config_file = config_file or DEFAULT_CONFIG
            self._image_key: Optional[str] = None
            self._auto_boxes: Optional[Tuple[str, np.ndarray]] = None
            self._image_cache: Optional[Tuple[str, float, np.ndarray]] = None
        self.default_vocabulary = predictor.default_vocabulary or "lvis"
        try:  # warm the cache, so the first request does not pay for the default vocabulary
            predictor.vocabulary_embeddings(vocabulary_from_text(self.default_vocabulary)[0])
        except (DemoError, KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
            logger.warning(f"Default vocabulary {self.default_vocabulary!r}: {e}")
        return self.model_line()

    def model_line(self) -> str:
        weights = self.cfg.MODEL.WEIGHTS
        head = f"head `{weights}`" if weights else (
            "**random head: its labels mean nothing** (train one with `./tools/quickstart.sh`, then reload, "
            "or give a checkpoint)")
        where = "onnxruntime" if self.onnx else f"`{self.predictor.device}`"
        return f"Model: `{self.config_file}`, {head}, on {where}."

    # ------------------------------------------------------------------ image
    def read(self, path: Optional[str]) -> np.ndarray:
        """The RGB image of an uploaded file (the last one is kept decoded)."""
        if not path:
            raise DemoError("No image: upload one (or pick an example) first.")
        with self.lock:
            try:
                stamp = os.path.getmtime(path)
                if self._image_cache and self._image_cache[:2] == (path, stamp):
                    return self._image_cache[2]
                rgb = read_image(path, format="RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DemoError(f"Cannot read the image {os.path.basename(path)}: {e}") from e
            self._image_cache = (path, stamp, rgb)
            return rgb

    def set_image(self, path: Optional[str]) -> Tuple[np.ndarray, str, Optional[float]]:
        """(the RGB image, its key, seconds `set_image` took or None when the features were reused)."""
        rgb = self.read(path)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self.lock:
            if key == self._image_key:
                return rgb, key, None
            start = time.perf_counter()
            try:
                self.predictor.set_image(rgb, format="RGB")
            except (ValueError, RuntimeError) as e:
                raise DemoError(f"Cannot encode the image {os.path.basename(path)}: {e}") from e
            self._image_key = key
            return rgb, key, time.perf_counter() - start

    def auto_regions(self, path: Optional[str]) -> Tuple[List[Region], List[Tuple[str, float]]]:
        """Regions of SAM's automatic masks (their boxes), cached per image."""
        with self.lock:
            rgb, key, encoded = self.set_image(path)
            timings = [encode_timing(encoded)]
            if self._auto_boxes is None or self._auto_boxes[0] != key:
                start = time.perf_counter()
                try:
                    boxes = self.predictor.sam_auto_boxes().cpu().numpy()
                except RuntimeError as e:  # an exported folder has no automatic mask generator
                    raise DemoError(str(e)) from e
                self._auto_boxes = (key, boxes)
                timings.append(("SAM automatic masks", time.perf_counter() - start))
            else:
                timings.append(("SAM automatic masks (reused)", 0.0))
            boxes = self._auto_boxes[1]
        if not len(boxes):
            raise DemoError(SAM_AUTO_EMPTY_HINT)
        return [Region(box=[float(v) for v in b]) for b in boxes], timings

    # ------------------------------------------------------------------ regions
    def recognize(self, path: Optional[str], regions: Sequence[Region], vocabulary: str,
                  synonyms: bool = False, top_k: Optional[int] = None) -> Outcome:
        """Classify `regions` of the image at `path` against `vocabulary`: the predictor's
        `set_image` (skipped for the image already set), then one `predict` per group of regions."""
        top_k = int(top_k or self.top_k)
        with self.lock:
            rgb, _, encoded = self.set_image(path)
            timings = [encode_timing(encoded)]
            vocab, id_spec = vocabulary_from_text(vocabulary, synonyms, self.cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY,
                                                  may_open=self.access.may_open)
            start = time.perf_counter()
            try:
                names, _ = self.predictor.vocabulary_embeddings(vocab)
            except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
                raise DemoError(f"Vocabulary: {str(e).strip(chr(34))}") from e
            timings.append((f"vocabulary ({len(names)} classes)", time.perf_counter() - start))
            check_regions(regions, rgb.shape[:2])
            start = time.perf_counter()
            parts = []
            for group in prompt_groups(regions):
                try:
                    res = self.predictor.predict(**prompt_arrays([regions[i] for i in group]), vocabulary=vocab,
                                                 top_k=min(top_k, len(names)), return_masks=True).cpu()
                except ValueError as e:
                    raise DemoError(str(e)) from e
                parts.append(region_instances(res, [i + 1 for i in group]))
            if parts:
                timings.append((f"regions ({len(regions)}: SAM decoder + head)", time.perf_counter() - start))
        instances = Instances.cat(parts) if parts else empty_instances(rgb.shape[:2])
        instances = instances[instances.region_ids.argsort()]
        return Outcome(instances, list(names), id_spec, timings)

    # ------------------------------------------------------------------ outputs
    def render(self, path: Optional[str], outcome: Optional[Outcome], threshold: float = 0.0,
               regions: Sequence[Region] = (), pending: Optional[Sequence[float]] = None
               ) -> Tuple[np.ndarray, pd.DataFrame, Optional[str], List[Tuple[str, float]]]:
        """(picture, table, COCO-format JSON file or None, [("drawing", seconds)]) of an outcome (None:
        the image and its points only), as the page shows them; regions scoring below `threshold`
        are left out of all three, as tools/demo.py's --confidence-threshold does."""
        rgb = self.read(path)
        start = time.perf_counter()
        pts, labels = prompt_points(regions, pending)
        if outcome is None:
            picture = draw_regions(rgb, empty_instances(rgb.shape[:2]), results_metadata([]), points=pts,
                                   point_labels=labels).get_image()
            return picture, pd.DataFrame(columns=TABLE_COLUMNS), None, []
        inst = outcome.instances[outcome.instances.scores >= threshold]
        picture = draw_regions(rgb, inst, results_metadata(outcome.names), region_ids=inst.region_ids.tolist(),
                               points=pts, point_labels=labels).get_image()
        drawing = time.perf_counter() - start
        rows = table_rows(inst, outcome.names, {k: r.text() for k, r in enumerate(regions, start=1)})
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        json_path = None
        if len(inst):
            records = result_records(inst, image_id_of(path, {}), outcome.names, outcome.id_spec)
            stem = os.path.splitext(os.path.basename(path))[0]
            folder = tempfile.mkdtemp(dir=self.output_dir)
            json_path = os.path.join(folder, f"{stem}_regionspot.json")
            atomic_write_bytes(json.dumps(records).encode(), json_path)
        return picture, table, json_path, [("drawing", drawing)]


# ---------------------------------------------------------------------------------- the page
CSS = """
#canvas img { cursor: crosshair; }
"""


def build_app(demo: WebDemo, examples: Sequence[str] = ()) -> gr.Blocks:
    """The Gradio page. Its public API (gradio_client) has three endpoints, all taking the image
    file: /set_image(image), /predict(image, prompts, vocabulary, synonyms, top_k, threshold) and
    /segment_everything(image, vocabulary, synonyms, top_k, threshold). The clicks, buttons and
    the Model panel are page-only events."""

    def fail(e: Exception) -> gr.Error:
        return gr.Error(html.escape(str(e), quote=False), duration=None, title="RegionSpot", print_exception=False)

    def set_image(image):
        if not image:
            return None, pd.DataFrame(columns=TABLE_COLUMNS), None, "Upload an image or pick an example.", "", None
        try:
            _, _, seconds = demo.set_image(image)
            picture, table, _, _ = demo.render(image, None)
        except DemoError as e:
            raise fail(e)
        status = timings_line([encode_timing(seconds)]) + "  \nClick on the image to add prompts."
        return picture, table, None, status, "", None

    def predict(image, prompts, vocabulary, synonyms, top_k, threshold, pending=None):
        if not image:  # e.g. an option changed before any upload: nothing to do yet
            return None, pd.DataFrame(columns=TABLE_COLUMNS), None, "Upload an image or pick an example."
        try:
            regions = parse_prompts(prompts)
            outcome = demo.recognize(image, regions, vocabulary, synonyms, top_k) if regions else None
            picture, table, json_path, drawing = demo.render(image, outcome, threshold or 0.0, regions, pending)
        except DemoError as e:
            raise fail(e)
        if outcome is not None:
            status = timings_line(outcome.timings + drawing)
        else:
            status = "Click on the image (or type prompts) to add regions."
        if pending is not None:
            status += "  \nClick the box's opposite corner."
        return picture, table, json_path, status

    def segment_everything(image, vocabulary, synonyms, top_k, threshold):
        try:
            regions, auto_timings = demo.auto_regions(image)
            text = "\n".join(r.text() for r in regions)
            regions = parse_prompts(text)  # what the prompt box will hold, so later runs give the same
            outcome = demo.recognize(image, regions, vocabulary, synonyms, top_k)
            picture, table, json_path, drawing = demo.render(image, outcome, threshold or 0.0, regions)
        except DemoError as e:
            raise fail(e)
        return text, picture, table, json_path, timings_line(auto_timings + outcome.timings[1:] + drawing)

    def on_click(prompts, mode, pending, evt: gr.SelectData):
        return add_click(prompts, mode, pending, float(evt.index[0]), float(evt.index[1]))

    def new_region(prompts):
        return new_region_text(prompts), None

    def undo(prompts):
        return undo_last_item(prompts), None

    def load_model(config_file, weights, opts, request: gr.Request):
        # Checked here, in the server, for every request: hiding the event from the API does not
        # stop a process that posts to the queue with its fn_index.
        try:
            path = demo.access.check_model_request(config_file.strip() or demo.config_file, weights.strip(),
                                                   opts.split(), request)
            line = demo.load_model(path, weights.strip(), opts.split())
        except DemoError as e:
            raise fail(e)
        return line, demo.default_vocabulary, None, pd.DataFrame(columns=TABLE_COLUMNS), None, line

    with gr.Blocks(title="RegionSpot", analytics_enabled=False) as app:
        gr.Markdown("## RegionSpot: recognize any region\nClick on the image for a point, or twice for a box's "
                    "corners; type the names you want. Each region gets SAM's mask and its best names.")
        model_line = gr.Markdown(demo.model_line(), elem_id="model_line")
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                image = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image_file",
                                height=90)
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Synthetic examples",
                                examples_per_page=len(examples))
                vocabulary = gr.Textbox(label="Vocabulary: names separated by commas (synonyms: name | synonym), "
                                              "or lvis, coco, a dataset, an embedding file",
                                        value=demo.default_vocabulary, lines=1, elem_id="vocabulary")
                mode = gr.Radio(list(CLICK_MODES), value=CLICK_MODES[0], label="A click adds", elem_id="mode")
                prompts = gr.Textbox(label="Region prompts, one region per line: box x0 y0 x1 y1; fg x y; bg x y",
                                     lines=3, max_lines=8, elem_id="prompts",
                                     placeholder="box 30 40 110 120\nfg 70 80; bg 90 100")
                with gr.Row():
                    new_btn = gr.Button("New region", size="sm", elem_id="new_region")
                    undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                with gr.Row():
                    run_btn = gr.Button("Recognize", variant="primary", elem_id="run")
                    auto_btn = gr.Button("Segment everything", elem_id="everything")
                with gr.Accordion("Options", open=False):
                    synonyms = gr.Checkbox(label="Average a dataset's synonyms (lvis, ...)", value=False)
                    top_k = gr.Slider(1, 10, value=demo.top_k, step=1, label="Classes per region (top-k)")
                    threshold = gr.Slider(0, 1, value=0, step=0.01, label="Score threshold (picture and JSON)")
                with gr.Accordion("Model", open=False, elem_id="model_panel"):
                    config_box = gr.Textbox(label="Config file (a path or a model-zoo name)", value=demo.config_file,
                                            elem_id="config_file")
                    weights_box = gr.Textbox(label="Checkpoint (MODEL.WEIGHTS; empty = a random head)",
                                             value=demo.cfg.MODEL.WEIGHTS, elem_id="weights")
                    opts_box = gr.Textbox(label="Config overrides (KEY VALUE ...)", value="", elem_id="opts")
                    load_btn = gr.Button("Load model", elem_id="load_model",
                                         interactive=demo.access.allow_model_change)
                    if not demo.access.allow_model_change:
                        gr.Markdown(MODEL_CHANGE_OFF, elem_id="model_change_off")
            with gr.Column(scale=3, min_width=400):
                canvas = gr.Image(label="Result (click to add prompts)", type="numpy", format="png",
                                  interactive=False, elem_id="canvas", buttons=["download", "fullscreen"])
                status = gr.Markdown(elem_id="status", label="Status")
                table = gr.Dataframe(headers=TABLE_COLUMNS, label="Regions: top-k classes", interactive=False,
                                     elem_id="table", wrap=True)
                json_file = gr.File(label="COCO-format results (JSON)", elem_id="json", interactive=False,
                                    height=60)
        pending = gr.State(None)

        outputs = [canvas, table, json_file, status]
        inputs = [image, prompts, vocabulary, synonyms, top_k, threshold]
        private = {"api_visibility": "private"}
        image.change(set_image, [image], outputs + [prompts, pending], api_name="set_image")
        run_btn.click(predict, inputs, outputs, api_name="predict")
        auto_btn.click(segment_everything, [image, vocabulary, synonyms, top_k, threshold], [prompts] + outputs,
                       api_name="segment_everything")
        vocabulary.submit(predict, inputs, outputs, **private)
        synonyms.input(predict, inputs, outputs, **private)
        top_k.release(predict, inputs, outputs, **private)
        threshold.release(predict, inputs, outputs, **private)
        canvas.select(on_click, [prompts, mode, pending], [prompts, pending], **private).then(
            predict, inputs + [pending], outputs, **private)
        new_btn.click(new_region, [prompts], [prompts, pending], **private)
        undo_btn.click(undo, [prompts], [prompts, pending], **private).then(predict, inputs, outputs, **private)
        clear_btn.click(lambda: ("", None), None, [prompts, pending], **private).then(
            predict, inputs, outputs, **private)
        mode.change(lambda: None, None, [pending], **private)
        load_btn.click(load_model, [config_box, weights_box, opts_box],
                       [model_line, vocabulary, canvas, table, json_file, status], **private).then(
            set_image, [image], outputs + [prompts, pending], **private)
    return app


# ---------------------------------------------------------------------------------- command line
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="RegionSpot web demo (Gradio).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                   help="a RegionSpot config (path or model-zoo name); default: the offline tiny quickstart model")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="the RegionSpot checkpoint; default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth if it "
                        "exists (the quickstart's trained head), else a random head")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0 = any free port)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per region (default 3)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the internet)")
    p.add_argument("--allow-paths", action="append", default=[], metavar="DIR",
                   help="a folder whose files visitors may name in the page (vocabulary files; with "
                        "--allow-model-change, configs and checkpoints); repeatable. Without it the page opens no "
                        "server path a visitor types: files come by upload")
    p.add_argument("--allow-model-change", action="store_true",
                   help="let the page's Model panel load shipped configs, and configs and checkpoints under "
                        "--allow-paths (off by default, on any address)")
    p.add_argument("--onnx", default="", metavar="DIR",
                   help="serve an exported folder (tools/export_onnx.py) on onnxruntime instead of --config-file's "
                        "model; the Model panel is then off")
    p.add_argument("--no-examples", action="store_true", help="do not offer the synthetic example images")
    p.add_argument("--verbose", action="store_true", help="also print detectron2's and RegionSpot's info logs")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.DEVICE cpu")
    return p


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(argv: Optional[Sequence[str]] = None, block: bool = True):
    """Parse `argv`, build the model and the page, and serve it. Returns (app, url) when `block`
    is False (stop it with `app.close()`); raises SystemExit(2) for bad options or a model that
    cannot be loaded."""
    args = get_parser().parse_args(argv)
    if args.top_k < 1:
        print(f"web_demo.py: error: --top-k must be at least 1, got {args.top_k}.", file=sys.stderr)
        raise SystemExit(2)
    for folder in args.allow_paths:
        if not os.path.isdir(folder):
            print(f"web_demo.py: error: --allow-paths {folder}: not a folder.", file=sys.stderr)
            raise SystemExit(2)
    try:
        demo = WebDemo(args.config_file, args.weights, args.opts, top_k=args.top_k, allow_paths=args.allow_paths,
                       allow_model_change=args.allow_model_change and not args.onnx, onnx=args.onnx)
    except DemoError as e:
        print(f"web_demo.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    examples = [] if args.no_examples else synthetic_examples()[0]
    app = build_app(demo, examples)
    port = free_port(args.host) if args.port == 0 else args.port
    app.queue(default_concurrency_limit=1)  # one request at a time on the one predictor
    try:
        # show_error: any unexpected exception is a message in the page too (never a traceback);
        # ssr_mode off: no Node server; the page's assets all come from this server.
        app.launch(server_name=args.host, server_port=port, share=args.share, prevent_thread_lock=not block,
                   show_error=True, ssr_mode=False, quiet=not block, theme=gr.themes.Default(primary_hue="blue"),
                   css=CSS, allowed_paths=[os.path.dirname(p) for p in examples[:1]] + [demo.output_dir],
                   max_file_size="100mb")
    except OSError as e:
        print(f"web_demo.py: error: cannot serve on {args.host}:{port} ({e}); try another --port (0 = any free one).",
              file=sys.stderr)
        raise SystemExit(2)
    return app, f"http://{args.host}:{port}/"


def _stop_on_sigterm() -> None:
    """A service manager's stop (SIGTERM) ends the server as Ctrl-C does, so the exit handlers run
    (the temporary folder is removed); Python's default for SIGTERM skips them."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _stop_on_sigterm()
    try:
        serve(argv, block=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    from regionspot.utils.console import setup_run_logging

    setup_run_logging(verbose=get_parser().parse_known_args()[0].verbose)
    sys.exit(main())
