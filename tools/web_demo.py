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
import html
import os
import signal
import socket
import sys
import threading
from typing import Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

from regionspot.config import get_regionspot_cfg  # noqa: E402,F401  (tests build configs through the tool)
from regionspot.demo import session  # noqa: E402
from regionspot.demo.access import MODEL_CHANGE_OFF  # noqa: E402
from regionspot.demo.errors import DemoError  # noqa: E402
from regionspot.demo.examples import synthetic_examples  # noqa: E402
from regionspot.demo.prompt_lines import (  # noqa: E402,F401  (parse_prompts and CLICK_MODES: the page's grammar)
    CLICK_MODES, add_click, new_region_text, parse_prompts, undo_last_item)
from regionspot.demo.results import TABLE_COLUMNS, encode_timing, timings_line  # noqa: E402
from regionspot.demo.session import DEFAULT_CONFIG  # noqa: E402
from regionspot.demo.vocabulary_text import vocabulary_from_text  # noqa: E402,F401  (the vocabulary box's reader)
from regionspot.utils.extras import require_extra  # noqa: E402

gr = require_extra("gradio", "web", "The web demo (tools/web_demo.py)")
import pandas as pd  # noqa: E402  (a dependency of gradio)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------- the demo
def default_weights(cfg) -> str:
    """`session.default_weights`, looking in the working directory and this repository."""
    return session.default_weights(cfg, (ROOT,))


class WebDemo(session.WebDemo):
    """The page's work (`regionspot.demo.session.WebDemo`), finding a trained head in this repository too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("weights_roots", (ROOT,))
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------------------- the page
CSS = """
#canvas img { cursor: crosshair; }
"""


def build_app(demo: WebDemo, examples: Sequence[str] = ()) -> gr.Blocks:
    """The Gradio page. Its public API (gradio_client) has three endpoints, all taking the image
    file: /set_image(image), /predict(image, prompts, vocabulary, synonyms, top_k, threshold) and
    /segment_everything(image, vocabulary, synonyms, top_k, threshold). The clicks, buttons and
    the Model panel are page-only events."""

    def frame(rows) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    def fail(e: Exception) -> gr.Error:
        return gr.Error(html.escape(str(e), quote=False), duration=None, title="RegionSpot", print_exception=False)

    def set_image(image):
        if not image:
            return None, pd.DataFrame(columns=TABLE_COLUMNS), None, "Upload an image or pick an example.", "", None
        try:
            _, _, seconds = demo.set_image(image)
            picture, rows, _, _ = demo.render(image, None)
        except DemoError as e:
            raise fail(e)
        status = timings_line([encode_timing(seconds)]) + "  \nClick on the image to add prompts."
        return picture, frame(rows), None, status, "", None

    def predict(image, prompts, vocabulary, synonyms, top_k, threshold, pending=None):
        if not image:  # e.g. an option changed before any upload: nothing to do yet
            return None, pd.DataFrame(columns=TABLE_COLUMNS), None, "Upload an image or pick an example."
        try:
            regions = parse_prompts(prompts)
            outcome = demo.recognize(image, regions, vocabulary, synonyms, top_k) if regions else None
            picture, rows, json_path, drawing = demo.render(image, outcome, threshold or 0.0, regions, pending)
        except DemoError as e:
            raise fail(e)
        if outcome is not None:
            status = timings_line(outcome.timings + drawing)
        else:
            status = "Click on the image (or type prompts) to add regions."
        if pending is not None:
            status += "  \nClick the box's opposite corner."
        return picture, frame(rows), json_path, status

    def segment_everything(image, vocabulary, synonyms, top_k, threshold):
        try:
            regions, auto_timings = demo.auto_regions(image)
            text = "\n".join(r.text() for r in regions)
            regions = parse_prompts(text)  # what the prompt box will hold, so later runs give the same
            outcome = demo.recognize(image, regions, vocabulary, synonyms, top_k)
            picture, rows, json_path, drawing = demo.render(image, outcome, threshold or 0.0, regions)
        except DemoError as e:
            raise fail(e)
        return text, picture, frame(rows), json_path, timings_line(auto_timings + outcome.timings[1:] + drawing)

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
