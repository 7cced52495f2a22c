"""tools/web_demo.py in a real headless browser (Debian's Chromium, driven by Selenium): the page
loads offline, takes an uploaded image, a clicked point, a box drawn by two clicks and a typed
vocabulary, and shows what RegionSpotPredictor gives for those prompts; an empty vocabulary is a
message in the page. The server (tools/web_demo.py itself, on 127.0.0.1) and the browser stop at
the end of the test; a screenshot of the page is saved into the test's folder."""
import io

import numpy as np
import pytest
from PIL import Image

from regionspot.data.images import read_image
from regionspot.data.synthetic import DEFAULT_CLASSES
from test_web_demo import (assert_rows_equal, expected_picture, expected_regions, expected_rows, reference_predictor,
                           web_demo)

from conftest import load_tool

check = load_tool("check_web_demo")


@pytest.fixture
def page(quickstart_head, tmp_path):
    """A browser on the running web demo (the tiny model with `quickstart_head`); both stopped after."""
    try:
        check.browser_paths()
    except RuntimeError as e:
        pytest.fail(str(e))
    # The Model panel on, for files under tmp_path (the missing checkpoint below).
    args = ["--weights", quickstart_head, "--allow-model-change", "--allow-paths", str(tmp_path),
            "--opts", "MODEL.DEVICE", "cpu"]
    with check.start_server(args, log_path=str(tmp_path / "web_demo.log")) as url, check.start_browser() as driver, \
            check.screenshot_on_failure(driver, str(tmp_path / "web_demo.png")):
        check.open_page(driver, url)
        yield driver


def _rows(driver, count):
    """All rows of the table once it shows `count` regions."""
    check.region_rows(driver, count)
    return check.table_rows(driver)


def _picture(driver) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(check.canvas_png(driver))).convert("RGB"))


def test_page_point_box_vocabulary_in_a_browser(page, quickstart_head, shapes_image, tmp_path):
    driver = page
    path, shapes = shapes_image
    rgb = read_image(path, format="RGB")
    assert driver.title == "RegionSpot"
    assert quickstart_head in check.css(driver, "#model_line").text
    assert "examples_00000.png" in check.css(driver, "body").text  # the synthetic examples are offered

    check.upload(driver, path)
    assert np.array_equal(_picture(driver), rgb)  # the image as uploaded, no prompt yet
    assert "image encoders (set_image)" in check.css(driver, "#status").text

    # A click on the first shape: a foreground point.
    (_, (x0, y0, x1, y1)), (_, (bx0, by0, bx1, by1)) = shapes[0], shapes[1]
    target = ((x0 + x1) / 2, (y0 + y1) / 2)
    check.click_pixel(driver, *target)
    text = check.wait_for(lambda: check.text_of(driver, "#prompts"), what="the clicked point in the prompt box")
    point = web_demo.parse_prompts(text)[0].points[0]
    assert point[2] == 1 and abs(point[0] - target[0]) <= 1.5 and abs(point[1] - target[1]) <= 1.5
    reference = reference_predictor(quickstart_head)
    reference.set_image(rgb, format="RGB")
    names = list(DEFAULT_CLASSES)
    ref = expected_regions([(reference.predict(points=[[point[:2]]], point_labels=[[1]],
                                               vocabulary="synthetic_shapes_val", top_k=3), [1])])
    texts = {1: text}
    assert_rows_equal(_rows(driver, 1), expected_rows(ref, texts))
    assert np.array_equal(_picture(driver), expected_picture(rgb, ref, names, texts))

    # Two clicks in box mode around the second shape: a new region.
    check.choose_mode(driver, "box")
    check.click_pixel(driver, bx0 - 2, by0 - 2)
    assert "opposite corner" in check.css(driver, "#status").text
    check.click_pixel(driver, bx1 + 2, by1 + 2)
    text = check.wait_for(lambda: len(check.text_of(driver, "#prompts").splitlines()) == 2
                          and check.text_of(driver, "#prompts"), what="the box in the prompt box")
    regions = web_demo.parse_prompts(text)
    box = regions[1].box
    assert regions[1].points == [] and abs(box[0] - (bx0 - 2)) <= 1.5 and abs(box[3] - (by1 + 2)) <= 1.5

    # A typed vocabulary (with a synonym), submitted with Enter: the same two regions, new names.
    vocab = [["red circle", "round red thing"], "green square", "blue triangle", "yellow circle"]
    check.set_text(driver, "#vocabulary", "red circle | round red thing, green square, blue triangle, yellow circle",
                   submit=True)
    names = [v if isinstance(v, str) else v[0] for v in vocab]
    ref = expected_regions([
        (reference.predict(boxes=[box], vocabulary=vocab, top_k=3), [2]),
        (reference.predict(points=[[point[:2]]], point_labels=[[1]], vocabulary=vocab, top_k=3), [1]),
    ])
    texts = {1: regions[0].text(), 2: regions[1].text()}
    check.wait_for(lambda: check.region_rows(driver, 2)[0][3] in names, what="the new vocabulary's names")
    assert_rows_equal(_rows(driver, 2), expected_rows(ref, texts))
    assert np.array_equal(_picture(driver), expected_picture(rgb, ref, names, texts))
    status = check.css(driver, "#status").text
    assert "image encoders (reused)" in status and "vocabulary (4 classes)" in status

    check.fit_window(driver)
    screenshot = tmp_path / "web_demo.png"
    driver.save_screenshot(str(screenshot))
    print(f"Screenshot of the page: {screenshot}")
    assert Image.open(screenshot).size[1] > 600

    # An empty vocabulary: a message in the page, and the results stay.
    check.set_text(driver, "#vocabulary", " ", submit=True)
    messages = check.wait_for(lambda: check.error_messages(driver), what="an error message")
    assert any("The vocabulary is empty" in m for m in messages) and not any("Traceback" in m for m in messages)

    # A checkpoint that is not there, given in the Model panel: a message; the model stays.
    check.css(driver, "#model_panel button, #model_panel .label-wrap").click()
    # The accordion renders its fields after the click, not with it: wait for them.
    check.wait_for(lambda: check.css_all(driver, "#weights textarea, #weights input"), what="the Model panel's fields")
    check.set_text(driver, "#weights", str(tmp_path / "missing_head.pth"))
    check.css(driver, "#load_model").click()
    messages = check.wait_for(lambda: [m for m in check.error_messages(driver) if "missing_head.pth" in m],
                              what="the missing checkpoint's message")
    assert "Checkpoint file not found (MODEL.WEIGHTS)" in messages[0]
    assert quickstart_head in check.css(driver, "#model_line").text
    assert check.outside_requests(driver) == []  # everything came from 127.0.0.1
