"""tools/demo.py: pictures and COCO-format JSON for a folder, failures reported by name and in the
exit code, every prompt source, vocabularies and bad options."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from PIL import Image

from regionspot.data.synthetic import DEFAULT_CLASSES, make_synthetic_lvis

from conftest import HANG_TIMEOUT_S, ROOT, TINY_CONFIG, load_tool

DEMO = os.path.join(ROOT, "tools", "demo.py")
demo = load_tool("demo")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 synthetic images, one corrupt file, their gt boxes (XYXY, by file name) and their json."""
    root = str(tmp_path_factory.mktemp("demo"))
    json_path = make_synthetic_lvis(root, "val", num_images=3, seed=5, image_size=(96, 128))
    data = json.load(open(json_path))
    boxes = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(f"val_{a['image_id'] - 1:05d}.png", []).append([x, y, x + w, y + h])
    with open(os.path.join(root, "boxes.json"), "w") as f:
        json.dump(boxes, f)
    with open(os.path.join(root, "val", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    return {"images": os.path.join(root, "val"), "boxes": boxes, "boxes_file": os.path.join(root, "boxes.json"),
            "json": json_path, "root": root}


def _run(*args, opts=()):
    return demo.main(["--config-file", TINY_CONFIG, *args, "--opts", "MODEL.DEVICE", "cpu", *opts])


def test_cli_folder_with_a_corrupt_image(folder, tmp_path):
    """The script itself: pictures and JSON for the good images, the bad one named, exit code 1."""
    out, js = tmp_path / "vis", tmp_path / "res.json"
    env = dict(os.environ, REGIONSPOT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, DEMO, "--config-file", TINY_CONFIG, "--input", folder["images"],
         "--boxes", folder["boxes_file"], "--output", str(out), "--json-output", str(js),
         "--opts", "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=HANG_TIMEOUT_S,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "broken.png" in proc.stderr and "unreadable image" in proc.stderr
    assert "3 of 4 images done" in proc.stderr
    assert sorted(os.listdir(out)) == ["val_00000.png", "val_00001.png", "val_00002.png"]
    for name in os.listdir(out):
        drawn = np.asarray(Image.open(out / name).convert("RGB"))
        original = np.asarray(Image.open(os.path.join(folder["images"], name)).convert("RGB"))
        assert drawn.shape == original.shape and (drawn != original).mean() > 0.05  # something was drawn
    results = json.load(open(js))
    assert len(results) == sum(len(b) for b in folder["boxes"].values())  # one per box at threshold 0
    for r in results:
        assert r["image_id"] in folder["boxes"] and r["category_name"] == DEFAULT_CLASSES[r["category_id"] - 1]
        x, y, w, h = r["bbox"]
        assert any(np.allclose([x, y, x + w, y + h], b, atol=1e-3) for b in folder["boxes"][r["image_id"]])
        assert 0 < r["score"] <= 1 and mask_util.decode(r["segmentation"]).shape == (96, 128)


def test_proposals_as_coco_results_with_image_ids(folder, tmp_path):
    ids = {im["id"]: os.path.basename(im["coco_url"]) for im in json.load(open(folder["json"]))["images"]}
    proposals = []
    for image_id, name in ids.items():
        for k, (x0, y0, x1, y1) in enumerate(folder["boxes"][name]):
            proposals.append({"image_id": image_id, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.5 - 0.1 * k})
    with open(tmp_path / "props.json", "w") as f:
        json.dump(proposals, f)
    js = tmp_path / "res.json"
    good = [os.path.join(folder["images"], n) for n in sorted(ids.values())]
    torch.manual_seed(0)  # both runs below build the same random model
    assert _run("--input", *good, "--proposals", str(tmp_path / "props.json"), "--image-ids", folder["json"],
                "--proposal-topk", "1", "--classes-per-region", "2", "--json-output", str(js)) == 0
    results = json.load(open(js))
    assert sorted(r["image_id"] for r in results) == sorted(list(ids) * 2)  # top-1 box, 2 classes each
    assert len({tuple(r["bbox"]) for r in results if r["image_id"] == 1}) == 1
    # The same best boxes without scores: the proposal's score 0.5 multiplies the class probability.
    with open(tmp_path / "best.json", "w") as f:
        json.dump({name: folder["boxes"][name][:1] for name in ids.values()}, f)
    torch.manual_seed(0)
    assert _run("--input", *good, "--boxes", str(tmp_path / "best.json"), "--image-ids", folder["json"],
                "--classes-per-region", "2", "--json-output", str(tmp_path / "plain.json")) == 0
    plain = {(r["image_id"], r["category_id"]): r["score"] for r in json.load(open(tmp_path / "plain.json"))}
    assert len(plain) == len(results)
    for r in results:
        assert r["score"] == pytest.approx(0.5 * plain[(r["image_id"], r["category_id"])], rel=1e-4)


def test_custom_vocabulary_text_boxes_and_threshold(folder, tmp_path):
    boxes = tmp_path / "b.txt"
    boxes.write_text("# every image\n0 0 60 60\n10, 20, 120, 90\n")
    js = tmp_path / "res.json"
    image = os.path.join(folder["images"], "val_00001.png")
    assert _run("--input", image, "--boxes", str(boxes), "--vocabulary", "custom",
                "--custom-vocabulary", "thing one, thing two", "--json-output", str(js),
                "--output", str(tmp_path / "one.png")) == 0
    results = json.load(open(js))
    assert len(results) == 2 and {r["category_name"] for r in results} <= {"thing one", "thing two"}
    assert {r["category_id"] for r in results} <= {1, 2} and results[0]["image_id"] == "val_00001.png"
    assert Image.open(tmp_path / "one.png").size == (128, 96)  # a single image may go to a file
    assert _run("--input", image, "--boxes", str(boxes), "--vocabulary", "custom",
                "--custom-vocabulary", "thing one, thing two", "--json-output", str(js),
                "--confidence-threshold", "0.999") == 0
    assert json.load(open(js)) == []


def test_coco_vocabulary_writes_coco_category_ids(folder, tmp_path):
    js = tmp_path / "res.json"
    assert _run("--input", os.path.join(folder["images"], "val_00000.png"), "--boxes", folder["boxes_file"],
                "--vocabulary", "coco", "--classes-per-region", "5", "--json-output", str(js)) == 0
    meta = MetadataCatalog.get("coco_2017_val")
    to_name = {k: meta.thing_classes[v] for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    results = json.load(open(js))
    assert len(results) == 5 * len(folder["boxes"]["val_00000.png"])
    assert all(to_name[r["category_id"]] == r["category_name"] for r in results)


def test_sam_auto_prompts(folder, tmp_path):
    js = tmp_path / "res.json"
    assert _run("--input", os.path.join(folder["images"], "val_00002.png"), "--sam-auto", "--json-output", str(js),
                opts=("MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4", "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH",
                      "0.0", "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0")) == 0
    results = json.load(open(js))
    assert len(results) >= 1 and all(r["bbox"][2] > 0 and r["bbox"][3] > 0 for r in results)


def test_sam_auto_without_masks_says_why(folder, tmp_path, capsys):
    """The tiny SAM's masks all fail the default IoU/stability thresholds: the summary says so."""
    js = tmp_path / "res.json"
    assert _run("--input", os.path.join(folder["images"], "val_00002.png"), "--sam-auto", "--json-output", str(js),
                opts=("MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "2")) == 0
    assert json.load(open(js)) == []
    err = capsys.readouterr().err
    assert "1 of 1 images got no --sam-auto region" in err
    assert "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH" in err


def test_an_image_missing_from_the_boxes_file(folder, tmp_path, capsys):
    partial = {k: v for k, v in folder["boxes"].items() if k != "val_00002.png"}
    with open(tmp_path / "partial.json", "w") as f:
        json.dump(partial, f)
    js = tmp_path / "res.json"
    good = [os.path.join(folder["images"], f"val_0000{i}.png") for i in range(3)]
    assert _run("--input", *good, "--boxes", str(tmp_path / "partial.json"), "--json-output", str(js)) == 1
    assert "val_00002.png: no prompts in" in capsys.readouterr().err
    assert {r["image_id"] for r in json.load(open(js))} == set(partial)
    assert _run("--input", *good, "--boxes", str(tmp_path / "partial.json"), "--json-output", str(js),
                opts=("MODEL.REGIONSPOT.MISSING_PROPOSALS", "empty")) == 0


def test_inputs_by_glob_and_name_collisions(folder, tmp_path, capsys):
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(os.path.join(folder["images"], "val_00000.png"), other / "val_00000.png")
    out = tmp_path / "vis"
    assert _run("--input", os.path.join(folder["images"], "val_0000[01].png"), str(other),
                str(tmp_path / "typo*.jpg"), "--boxes", folder["boxes_file"], "--output", str(out)) == 1
    assert "typo*.jpg: matches no image file" in capsys.readouterr().err  # reported; the rest still done
    assert sorted(os.listdir(out)) == ["val_00000.png", "val_00000_1.png", "val_00001.png"]


@pytest.mark.parametrize("args,message", [
    (["--vocabulary", "custom", "--custom-vocabulary", "cat,dog,cat"], "more than once"),
    (["--vocabulary", "custom"], "needs --custom-vocabulary"),
    (["--vocabulary", "lvis", "--custom-vocabulary", "cat"], "needs --vocabulary custom"),
    (["--vocabulary", "no_such_set"], "Unknown vocabulary 'no_such_set'"),
    (["--vocabulary", "coco", "--synonyms"], "'coco' has no synonyms"),
    (["--vocabulary", "missing_vocab.pth"], "Text-embedding file not found"),
])
def test_bad_vocabulary_options_exit_2(folder, capsys, args, message):
    assert _run("--input", folder["images"], "--boxes", folder["boxes_file"], *args) == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_and_prompt_files_exit_2(folder, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"val_00000.png": [[1, 2, 3]]}')
    cases = [
        (["--input", str(tmp_path / "nothing*.png"), "--boxes", folder["boxes_file"]], "No images found"),
        (["--input", folder["images"], "--boxes", str(bad)], "boxes must have shape (N, 4)"),
        (["--input", folder["images"], "--boxes", str(tmp_path / "none.json")], "Cannot read the boxes file"),
        (["--input", folder["images"], "--proposals", str(bad)], "Cannot read --proposals"),
    ]
    for args, message in cases:
        assert _run(*args) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: exactly one prompt source
        _run("--input", folder["images"], "--boxes", folder["boxes_file"], "--sam-auto")
    assert e.value.code == 2


def test_16bit_png_is_scaled_like_its_8bit_original(folder, tmp_path):
    """A 16-bit grayscale PNG gives the results of the 8-bit image it was made from (detectron2's
    reader would clip it to white)."""
    gray = np.asarray(Image.open(os.path.join(folder["images"], "val_00000.png")).convert("L"))
    for sub, pixels in (("g8", gray), ("g16", gray.astype(np.uint16) * 257)):
        os.makedirs(tmp_path / sub)
        Image.fromarray(pixels).save(tmp_path / sub / "img.png")
    boxes = tmp_path / "b.txt"
    boxes.write_text("0 0 60 60\n10 20 120 90\n")
    out = {}
    for sub in ("g8", "g16"):
        js = tmp_path / f"{sub}.json"
        torch.manual_seed(0)  # the same random head in both runs
        assert _run("--input", str(tmp_path / sub / "img.png"), "--boxes", str(boxes), "--json-output", str(js)) == 0
        out[sub] = [(r["category_id"], r["score"]) for r in json.load(open(js))]
    assert len(out["g8"]) == 2 and out["g8"] == out["g16"]


def test_nan_in_a_boxes_file_is_a_usage_error(folder, tmp_path, capsys):
    bad = tmp_path / "nan.json"
    bad.write_text('{"val_00000.png": [[1, 2, 30, 40], [1, 2, NaN, 40]]}')
    assert _run("--input", folder["images"], "--boxes", str(bad)) == 2
    err = capsys.readouterr().err
    assert "nan.json" in err and "val_00000.png" in err and "rows [1]" in err and "NaN" in err
