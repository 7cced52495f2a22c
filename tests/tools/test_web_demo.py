"""tools/web_demo.py through its API (gradio_client), on the tiny offline model: an upload, a
point, a box, a vocabulary change and "segment everything" give what RegionSpotPredictor gives for
the same inputs; bad inputs come back as messages; the server binds 127.0.0.1 and stops after
each test."""
import html
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Boxes, Instances
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from regionspot.config import get_regionspot_cfg
from regionspot.data.images import read_image
from regionspot.data.synthetic import DEFAULT_CLASSES
from regionspot.demo.results import results_metadata
from regionspot.predictor import RegionSpotPredictor
from regionspot.visualization import draw_regions

from conftest import HANG_TIMEOUT_S, QUICKSTART_CONFIG, load_tool

web_demo = load_tool("web_demo")

SAM_AUTO_OPEN = ["MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0", "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH",
                 "0.0", "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4"]


def _serve(head, *extra):
    return web_demo.serve(["--port", "0", "--weights", head, "--no-examples", "--opts", "MODEL.DEVICE", "cpu", *extra],
                          block=False)


@pytest.fixture
def server(quickstart_head):
    app, url = _serve(quickstart_head)
    yield url
    app.close()


def reference_predictor(head, *opts) -> RegionSpotPredictor:
    """RegionSpotPredictor on the same model as the page (the tiny quickstart model, `head`)."""
    return RegionSpotPredictor.from_config_file(QUICKSTART_CONFIG, weights=head, opts=["MODEL.DEVICE", "cpu", *opts],
                                                top_k=3)


@pytest.fixture
def reference(quickstart_head):
    return reference_predictor(quickstart_head)


def _client(url, tmp_path):
    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def expected_regions(calls):
    """[(region number, box, mask, top-k names, top-k scores)] by region number, from the
    reference's results: `calls` is a list of (RegionResults, the region number of each prompt)."""
    ref = []
    for res, ids in calls:
        res = res.cpu()
        for i in range(len(res)):
            ref.append((ids[int(res.prompt_indices[i])], res.boxes[i], res.masks[i], res.topk_names[i],
                        res.topk_scores[i].tolist()))
    return sorted(ref, key=lambda r: r[0])


def expected_rows(ref, texts):
    """The table the page should show: (region, prompt, rank, class, score) rows."""
    return [(number, texts[number] if rank == 1 else "", rank, name, score)
            for number, _, _, topk, scores in ref for rank, (name, score) in enumerate(zip(topk, scores), start=1)]


def expected_picture(rgb, ref, names, texts):
    """The picture the page should show: the reference's regions drawn by `draw_regions`, numbered,
    with the prompts' points."""
    drawn = Instances(rgb.shape[:2])
    drawn.pred_boxes = Boxes(torch.stack([r[1] for r in ref]).reshape(-1, 4))
    drawn.scores = torch.tensor([r[4][0] for r in ref])
    drawn.pred_classes = torch.tensor([names.index(r[3][0]) for r in ref])
    drawn.pred_masks = torch.stack([r[2] for r in ref])
    points = [p for line in texts.values() for p in web_demo.parse_prompts(line)[0].points]
    return draw_regions(rgb, drawn, results_metadata(names), region_ids=[r[0] for r in ref],
                        points=np.array([p[:2] for p in points]).reshape(-1, 2),
                        point_labels=np.array([p[2] for p in points])).get_image()


def assert_rows_equal(rows, expected):
    assert len(rows) == len(expected), (rows, expected)
    for row, exp in zip(rows, expected):
        assert [int(row[0]), row[1], int(row[2]), row[3]] == list(exp[:4]), (row, exp)
        assert abs(float(row[4]) - exp[4]) < 1e-5, (row, exp)


def _check_same(outputs, calls, rgb, names, region_ids, texts):
    """The page's picture, table and JSON equal the reference's, pixel for pixel and to 1e-5."""
    picture, table, json_path, status = outputs
    ref = expected_regions(calls)
    assert [r[0] for r in ref] == region_ids
    assert_rows_equal(table["data"], expected_rows(ref, texts))
    # The COCO-format JSON: boxes, masks, scores, class names and ids, one detection per region.
    records = json.load(open(json_path))
    assert len(records) == len(ref)
    for rec in records:
        x, y, w, h = rec["bbox"]
        match = [r for r in ref if np.allclose(r[1].tolist(), [x, y, x + w, y + h], atol=1e-4)
                 and r[3][0] == rec["category_name"]]
        assert len(match) == 1, rec
        _, box, mask, topk, scores = match[0]
        assert abs(rec["score"] - scores[0]) < 1e-5
        assert np.array_equal(mask_util.decode(rec["segmentation"]).astype(bool), mask.numpy())
        assert rec["category_id"] == names.index(topk[0]) + 1
    assert np.array_equal(np.asarray(Image.open(picture).convert("RGB")), expected_picture(rgb, ref, names, texts))
    return status


def test_api_upload_point_box_vocabulary_equal_the_predictor(server, reference, shapes_image, tmp_path):
    path, shapes = shapes_image
    client = _client(server, tmp_path)
    rgb = read_image(path, format="RGB")
    picture, table, json_path, status, prompts, = client.predict(handle_file(path), api_name="/set_image")
    assert "image encoders (set_image)" in status and prompts == "" and json_path is None
    assert np.array_equal(np.asarray(Image.open(picture).convert("RGB")), rgb)  # no prompt yet: the image
    reference.set_image(rgb, format="RGB")

    names = list(DEFAULT_CLASSES)
    (_, (x0, y0, x1, y1)), (_, box2) = shapes[0], shapes[1]
    cx, cy = round((x0 + x1) / 2), round((y0 + y1) / 2)
    # A point.
    out = client.predict(handle_file(path), f"fg {cx} {cy}", "synthetic_shapes_val", False, 3, 0, api_name="/predict")
    ref = reference.predict(points=[[[cx, cy]]], point_labels=[[1]], vocabulary="synthetic_shapes_val", top_k=3)
    status = _check_same(out, [(ref, [1])], rgb, names, [1], {1: f"fg {cx} {cy}"})
    assert "image encoders (reused)" in status  # the second request on this image encoded nothing
    assert "vocabulary (6 classes)" in status and "regions (1: SAM decoder + head)" in status

    # A box, refined by a point, beside a point-only region and a second box: two predict calls.
    box = [round(v) for v in box2]
    text = f"box {' '.join(map(str, box))}; fg {round((box[0] + box[2]) / 2)} {round((box[1] + box[3]) / 2)}\n" \
           f"fg {cx} {cy}; bg 2 2\nbox {x0 - 2:g} {y0 - 2:g} {x1 + 2:g} {y1 + 2:g}"
    lines = {k + 1: web_demo.parse_prompts(ln)[0].text() for k, ln in enumerate(text.splitlines())}
    out = client.predict(handle_file(path), text, "synthetic_shapes_val", False, 3, 0, api_name="/predict")
    regions = web_demo.parse_prompts(text)
    with_box = reference.predict(boxes=[regions[0].box, regions[2].box],
                                 points=[[regions[0].points[0][:2]], [[0, 0]]],  # padded: no point
                                 point_labels=[[1], [-1]], vocabulary="synthetic_shapes_val", top_k=3)
    points_only = reference.predict(points=[[[cx, cy], [2, 2]]], point_labels=[[1, 0]],
                                    vocabulary="synthetic_shapes_val", top_k=3)
    _check_same(out, [(with_box, [1, 3]), (points_only, [2])], rgb, names, [1, 2, 3], lines)

    # Another vocabulary, typed, with a synonym: the same boxes, new names; one region stays drawn.
    typed = "red circle | round red thing, green square, blue triangle, yellow circle"
    vocab = [["red circle", "round red thing"], "green square", "blue triangle", "yellow circle"]
    out = client.predict(handle_file(path), "box 1 1 80 70", typed, False, 2, 0, api_name="/predict")
    ref = reference.predict(boxes=[[1, 1, 80, 70]], vocabulary=vocab, top_k=2)
    status = _check_same(out, [(ref, [1])], rgb, [v if isinstance(v, str) else v[0] for v in vocab], [1],
                         {1: "box 1 1 80 70"})
    assert "vocabulary (4 classes)" in status
    assert "image encoders (reused)" in status


def test_segment_everything_equals_the_predictor(quickstart_head, shapes_image, tmp_path):
    path, _ = shapes_image
    app, url = _serve(quickstart_head, *SAM_AUTO_OPEN)  # the tiny SAM needs open thresholds to keep any mask
    try:
        client = _client(url, tmp_path)
        prompts, picture, table, json_path, status = client.predict(
            handle_file(path), "synthetic_shapes_val", False, 3, 0, api_name="/segment_everything")
    finally:
        app.close()
    reference = reference_predictor(quickstart_head, *SAM_AUTO_OPEN)
    rgb = read_image(path, format="RGB")
    reference.set_image(rgb, format="RGB")
    auto = reference.sam_auto_boxes()
    regions = web_demo.parse_prompts(prompts)
    assert len(regions) == len(auto) > 0
    np.testing.assert_allclose([r.box for r in regions], auto.numpy(), atol=0.005)  # written to 0.01 px
    ref = reference.predict(boxes=[r.box for r in regions], vocabulary="synthetic_shapes_val", top_k=3)
    texts = {k + 1: r.text() for k, r in enumerate(regions)}
    _check_same((picture, table, json_path, status), [(ref, list(range(1, len(regions) + 1)))], rgb,
                list(DEFAULT_CLASSES), list(range(1, len(regions) + 1)), texts)
    assert "SAM automatic masks" in status


@pytest.mark.parametrize("prompts,vocabulary,message", [
    ("box 10 10 50 50", "  ", "The vocabulary is empty"),
    ("box 500 500 600 600", "cat, dog", "Region 1: the box [500, 500, 600, 600] has no area inside the 160x120"),
    ("fg 10 500", "cat, dog", "Region 1: the point (10, 500) lies outside the 160x120"),
    ("box 1 2 3", "cat, dog", "Prompt line 1: cannot read 'box 1 2 3'"),
    ("box 10 10 50 50", "cat, dog, cat", "The vocabulary from the vocabulary box names these classes more than once"),
])
def test_bad_input_is_a_message(server, shapes_image, tmp_path, prompts, vocabulary, message):
    client = _client(server, tmp_path)
    with pytest.raises(AppError) as e:
        client.predict(handle_file(shapes_image[0]), prompts, vocabulary, False, 3, 0, api_name="/predict")
    shown = html.unescape(str(e.value))  # the page shows the message as HTML
    assert message in shown and "Traceback" not in shown


def test_unreadable_image_is_a_message(server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    client = _client(server, tmp_path)
    with pytest.raises(AppError, match="Cannot read the image broken.png"):
        client.predict(handle_file(str(broken)), api_name="/set_image")
    with pytest.raises(AppError, match="automatic mask generator kept no mask"):
        # the tiny SAM at the default thresholds keeps no automatic mask: said, with the fix
        client.predict(handle_file(_an_image(tmp_path)), "cat", False, 3, 0, api_name="/segment_everything")


def _an_image(tmp_path):
    path = str(tmp_path / "plain.png")
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(path)
    return path


def test_server_binds_localhost_and_stops(quickstart_head):
    app, url = _serve(quickstart_head)
    try:
        assert url.startswith("http://127.0.0.1:") and app.server_name == "127.0.0.1"
        assert app.share is False and app.analytics_enabled is False
        urllib.request.urlopen(url + "config", timeout=HANG_TIMEOUT_S).close()  # answers
    finally:
        app.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "config", timeout=HANG_TIMEOUT_S)  # gone


def test_missing_checkpoint(quickstart_head, tmp_path, capsys):
    """At start: exit code 2 naming the file. In the page's Model panel: a message, and the model
    in use stays."""
    with pytest.raises(SystemExit) as e:
        web_demo.serve(["--weights", str(tmp_path / "nope.pth"), "--no-examples"], block=False)
    assert e.value.code == 2 and "Checkpoint file not found (MODEL.WEIGHTS)" in capsys.readouterr().err
    demo = web_demo.WebDemo(weights=quickstart_head, opts=["MODEL.DEVICE", "cpu"])
    before = demo.predictor
    with pytest.raises(web_demo.DemoError, match="Checkpoint file not found"):
        demo.load_model(QUICKSTART_CONFIG, str(tmp_path / "nope.pth"))
    assert demo.predictor is before


def test_default_head_is_the_quickstart_output(tmp_path, monkeypatch):
    cfg = get_regionspot_cfg(QUICKSTART_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(web_demo, "ROOT", str(tmp_path / "elsewhere"))
    assert web_demo.default_weights(cfg) == ""  # nothing trained: a random head (the page says so)
    os.makedirs(tmp_path / cfg.OUTPUT_DIR)
    (tmp_path / cfg.OUTPUT_DIR / "model_final.pth").write_bytes(b"")
    assert web_demo.default_weights(cfg) == os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def test_clicks_write_prompts():
    modes = web_demo.CLICK_MODES
    text, pending = web_demo.add_click("", modes[0], None, 10, 20)
    assert (text, pending) == ("fg 10 20", None)
    text, pending = web_demo.add_click(text, modes[1], None, 30.5, 40)
    assert text == "fg 10 20; bg 30.5 40"  # points refine the same region
    text, pending = web_demo.add_click(text, modes[2], None, 90, 80)
    assert text == "fg 10 20; bg 30.5 40" and pending == [90, 80]  # the first corner waits
    text, pending = web_demo.add_click(text, modes[2], pending, 50, 60)
    assert text == "fg 10 20; bg 30.5 40\nbox 50 60 90 80" and pending is None  # a box: a new region
    text, _ = web_demo.add_click(text, modes[0], None, 70, 70)
    assert text.splitlines()[-1] == "box 50 60 90 80; fg 70 70"
    text, _ = web_demo.add_click(text + "\n", modes[0], None, 5, 5)  # after "New region"
    assert text.splitlines()[-1] == "fg 5 5"
    regions = web_demo.parse_prompts(text)
    assert [r.box for r in regions] == [None, [50, 60, 90, 80], None]
    assert regions[1].points == [(70, 70, 1)] and regions[0].points == [(10, 20, 1), (30.5, 40, 0)]


def test_vocabulary_box():
    read = web_demo.vocabulary_from_text
    assert read("cat, dog | puppy , sofa") == ([["cat"], ["dog", "puppy"], ["sofa"]], None)
    assert read("cat, dog") == (["cat", "dog"], None)
    assert read("cat") == (["cat"], None)  # one name that is no vocabulary
    assert read("coco") == ("coco", "coco") and read(" lvis ") == ("lvis", "lvis")
    assert read("synthetic_shapes_val") == ("synthetic_shapes_val", "synthetic_shapes_val")
    assert read("lvis", synonyms=True)[0][0][0] == "aerosol_can"  # LVIS's synonym groups
    assert read("my_vocab.pth") == ("my_vocab.pth", None)
    assert read("custom", config_custom=["a", "b"]) == (["a", "b"], None)  # MODEL.REGIONSPOT.CUSTOM_VOCABULARY
    with pytest.raises(web_demo.DemoError, match="CUSTOM_VOCABULARY, which this model's config leaves empty"):
        read("custom")
    with pytest.raises(web_demo.DemoError, match="The vocabulary from the vocabulary box names these classes more"):
        read("a, b | c, a")
    with pytest.raises(web_demo.DemoError, match="empty"):
        read(" ")
