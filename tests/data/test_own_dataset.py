"""Your own data without writing Python: MODEL.REGIONSPOT.REGISTER_DATASETS names COCO/LVIS-format
files; train_net.py trains and evaluates on them and tools/demo.py uses their vocabulary."""
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

import train_net
from regionspot.config import get_regionspot_cfg
from regionspot.data.datasets import register_datasets_from_cfg
from regionspot.data.synthetic import make_synthetic_lvis

from conftest import load_tool

demo = load_tool("demo")

NAMES = ("mydata_train", "mydata_val")
ID_STEP = 10  # category ids 10, 20, ...: not 1..C, so a wrong id mapping shows


def _to_coco(lvis_json: str, split: str, out_json: str) -> dict:
    """The synthetic LVIS-format set as a plain COCO-format file, with non-contiguous category ids."""
    with open(lvis_json) as f:
        data = json.load(f)
    images = [{"id": im["id"], "width": im["width"], "height": im["height"],
               "file_name": f"{split}/{im['coco_url'].rsplit('/', 1)[1]}"} for im in data["images"]]
    anns = [dict(a, category_id=a["category_id"] * ID_STEP, iscrowd=0) for a in data["annotations"]]
    cats = [{"id": c["id"] * ID_STEP, "name": c["name"]} for c in data["categories"]]
    coco = {"images": images, "annotations": anns, "categories": cats}
    with open(out_json, "w") as f:
        json.dump(coco, f)
    return coco


@pytest.fixture
def own_data(tmp_path):
    """Two COCO-format files and their image folder, as a user would have them; unregistered after."""
    root = tmp_path / "mydata"
    coco = {}
    for split, n, seed in (("train", 8, 11), ("val", 3, 12)):
        lvis_json = make_synthetic_lvis(str(root), split, num_images=n, seed=seed)
        coco[split] = _to_coco(lvis_json, split, str(root / f"{split}.json"))
        os.remove(lvis_json)
    yield root, coco
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _register_opt(root) -> list:
    entries = [[name, str(root / f"{split}.json"), str(root)] for name, split in zip(NAMES, ("train", "val"))]
    return ["MODEL.REGIONSPOT.REGISTER_DATASETS", json.dumps(entries)]


def _forget_registrations():
    """As in a new process: the registrations must come from the config again."""
    for name in NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_train_evaluate_and_demo_on_own_coco_data(own_data, tmp_path, monkeypatch, capsys):
    root, coco = own_data
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "output" / "mydata"
    # 1. Train a few iterations (the final evaluation runs after training).
    args = default_argument_parser().parse_args([
        "--config-file", "quickstart/RegionSpot-tiny_synthetic.yaml", *_register_opt(root),
        "DATASETS.TRAIN", '("mydata_train",)', "DATASETS.TEST", '("mydata_val",)',
        "MODEL.REGIONSPOT.TOKEN_MODE", "online", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out)])
    train_net.main(args)
    with open(out / "metrics.json") as f:
        trained = [json.loads(line) for line in f if "bbox/AP" in line][-1]  # the final evaluation
    weights = out / "model_final.pth"
    assert weights.is_file()
    meta = MetadataCatalog.get("mydata_train")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == [c["name"] for c in coco["train"]["categories"]]
    assert sorted(meta.thing_dataset_id_to_contiguous_id) == [c["id"] for c in coco["train"]["categories"]]
    assert 0 <= trained["bbox/AP"] <= 100 and "segm/AP" in trained
    dets = json.load(open(out / "inference" / "mydata_val" / "coco_instances_results.json"))
    val_ids = {c["id"] for c in coco["val"]["categories"]}
    assert dets and {d["category_id"] for d in dets} <= val_ids  # the dataset's own ids
    assert {d["image_id"] for d in dets} == {im["id"] for im in coco["val"]["images"]}

    # 2. --eval-only from the config the run saved: it registers the data itself.
    _forget_registrations()
    args = default_argument_parser().parse_args([
        "--config-file", str(out / "config.yaml"), "--eval-only", "MODEL.WEIGHTS", str(weights),
        "OUTPUT_DIR", str(tmp_path / "output" / "mydata_eval")])
    evaluated = train_net.main(args)
    for task in ("bbox", "segm"):
        assert evaluated[task]["AP"] == pytest.approx(trained[f"{task}/AP"], abs=1e-6)

    # 3. The demo, with the training set's vocabulary, on the val images with their gt boxes.
    _forget_registrations()
    boxes = {}
    files = {im["id"]: os.path.basename(im["file_name"]) for im in coco["val"]["images"]}
    for a in coco["val"]["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(files[a["image_id"]], []).append([x, y, x + w, y + h])
    (tmp_path / "output" / "boxes.json").write_text(json.dumps(boxes))
    capsys.readouterr()
    code = demo.main(["--config-file", str(out / "config.yaml"), "--input", str(root / "val"),
                      "--boxes", "output/boxes.json", "--vocabulary", "mydata_train",
                      "--image-ids", str(root / "val.json"), "--output", "output/vis",
                      "--json-output", "output/results.json", "--opts", "MODEL.WEIGHTS", str(weights)])
    assert code == 0, capsys.readouterr().err
    results = json.load(open(tmp_path / "output" / "results.json"))
    names = {c["id"]: c["name"] for c in coco["train"]["categories"]}
    assert len(results) == sum(len(b) for b in boxes.values())  # one class per box
    assert all(names[r["category_id"]] == r["category_name"] for r in results)
    assert {r["image_id"] for r in results} == set(files)
    assert sorted(os.listdir(tmp_path / "output" / "vis")) == sorted(boxes)


def test_lvis_format_entry(tmp_path):
    json_path = make_synthetic_lvis(str(tmp_path), "val", num_images=2, seed=3)
    cfg = get_regionspot_cfg("quickstart/RegionSpot-tiny_synthetic.yaml", [
        "MODEL.REGIONSPOT.REGISTER_DATASETS", json.dumps([["mydata_val", json_path, str(tmp_path), "lvis"]])])
    try:
        dicts = DatasetCatalog.get("mydata_val")
        meta = MetadataCatalog.get("mydata_val")
        assert meta.evaluator_type == "lvis" and len(meta.thing_classes) == 6
        assert len(dicts) == 2 and all(os.path.isfile(d["file_name"]) for d in dicts)
        register_datasets_from_cfg(cfg)  # the same entry again: a no-op
    finally:
        DatasetCatalog.remove("mydata_val")
        MetadataCatalog.remove("mydata_val")


@pytest.mark.parametrize("entry, message", [
    (["only_a_name"], r"REGISTER_DATASETS\[0\] is \['only_a_name'\]"),
    (["x", "a.json", "imgs", "voc"], "format must be 'coco' or 'lvis'"),
    (["coco_2017_val", "a.json", "imgs"], "'coco_2017_val' is already registered"),
])
def test_bad_entries_name_the_problem(entry, message):
    with pytest.raises(ValueError, match=message):
        get_regionspot_cfg("", ["MODEL.REGIONSPOT.REGISTER_DATASETS", json.dumps([entry])])


def test_missing_file_names_the_key(tmp_path):
    get_regionspot_cfg("", ["MODEL.REGIONSPOT.REGISTER_DATASETS",
                            json.dumps([["mydata_val", str(tmp_path / "none.json"), str(tmp_path)]])])
    try:
        with pytest.raises(FileNotFoundError, match="none.json does not exist. Check MODEL.REGIONSPOT.REGISTER"):
            DatasetCatalog.get("mydata_val")
    finally:
        DatasetCatalog.remove("mydata_val")
        MetadataCatalog.remove("mydata_val")


def test_lvis_format_needs_categories_numbered_from_one(tmp_path):
    json_path = make_synthetic_lvis(str(tmp_path), "val", num_images=1, seed=3)
    data = json.load(open(json_path))
    for c in data["categories"]:
        c["id"] += 100
    json.dump(data, open(json_path, "w"))
    get_regionspot_cfg("", ["MODEL.REGIONSPOT.REGISTER_DATASETS",
                            json.dumps([["mydata_val", json_path, str(tmp_path), "lvis"]])])
    try:
        with pytest.raises(ValueError, match="must number its categories 1..C"):
            DatasetCatalog.get("mydata_val")
    finally:
        DatasetCatalog.remove("mydata_val")
        MetadataCatalog.remove("mydata_val")


def _break(coco: dict, how: str) -> dict:
    coco = json.loads(json.dumps(coco))
    if how == "category":
        coco["annotations"][1]["category_id"] = 999
    elif how == "duplicate":
        coco["images"][1]["id"] = coco["images"][0]["id"]
    return coco


@pytest.mark.parametrize("how, fmt", [("malformed", "coco"), ("malformed", "lvis"), ("category", "coco"),
                                      ("duplicate", "coco"), ("duplicate", "lvis")])
def test_bad_annotation_files_are_named_by_train_net(own_data, tmp_path, how, fmt):
    root, coco = own_data
    path = root / "val.json"
    if how == "malformed":
        path.write_text(json.dumps(coco["val"])[:-40] + '"unterminated')
    else:
        path.write_text(json.dumps(_break(coco["val"], how)))
    entry = ["mydata_val", str(path), str(root)] + ([fmt] if fmt == "lvis" else [])
    args = default_argument_parser().parse_args([
        "--config-file", "quickstart/RegionSpot-tiny_synthetic.yaml", "--eval-only",
        "MODEL.REGIONSPOT.REGISTER_DATASETS", json.dumps([entry]), "DATASETS.TEST", '("mydata_val",)',
        "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(ValueError) as info:
        train_net.main(args)
    message = str(info.value)
    assert str(path) in message and "'mydata_val'" in message, message
    if how == "malformed":
        assert "is not valid JSON" in message and "line 1" in message
    elif how == "category":
        assert "category_id 999" in message and "not among the file's categories" in message
    else:
        assert f"two images with id {coco['val']['images'][0]['id']!r}" in message
