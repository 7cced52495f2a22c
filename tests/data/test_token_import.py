"""Importing the original release's SAM token files (<root>/<folder>/<image_id>.pth with
`mask_tokens` and `classes`): matched to the annotations by count and class, refused by name when
the pairing is not certain, and then read by cached training."""
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.data.token_cache import load_tokens, token_cache_folder, token_file
from regionspot.data.token_import import import_released_tokens, match_order

from conftest import ROOT, TINY_CONFIG, tiny_cfg, load_tool

NAME = "token_import_test_set"
NO_RESIZE = ("INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "256")
TOOL = os.path.join(ROOT, "tools", "import_sam_tokens.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("import_data"))
    register_synthetic_lvis(NAME, make_synthetic_lvis(root, "train", num_images=8, seed=11), root)
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _write_release(folder, dicts, edit=None):
    """Released-layout files: one token per annotation, classes as 1-based category ids.
    Token i of an image is filled with 16 * image_id + i (exact in fp16), so a mispairing would show."""
    os.makedirs(folder, exist_ok=True)
    tokens_of = {}
    for d in dicts:
        anns = d["annotations"]
        tokens = torch.stack([torch.full((32,), 16.0 * d["image_id"] + i) for i in range(len(anns))])
        classes = [a["category_id"] + 1 for a in anns]
        payload = {"mask_tokens": tokens, "classes": classes}
        if edit is not None:
            payload = edit(d, payload) or payload
        torch.save(payload, os.path.join(folder, f"{d['image_id']}.pth"))
        tokens_of[d["image_id"]] = tokens
    return tokens_of


def _cfg(cache, *opts):
    return tiny_cfg("MODEL.REGIONSPOT.TOKEN_MODE", "cached", "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", cache,
                    "DATASETS.TRAIN", f"('{NAME}',)", *NO_RESIZE, *opts)


def test_match_order():
    assert match_order([3, 1, 3], [3, 1, 3]) == [0, 1, 2]
    assert match_order([1, 2, 5], [5, 1, 2]) == [2, 0, 1]  # unique classes: the class says whose
    assert match_order([1, 3, 3], [3, 1, 3]) is None  # repeated class reordered: not certain
    assert match_order([1, 2], [1, 2, 2]) is None


def test_import_then_cached_training_reads_the_right_tokens(dataset, tmp_path):
    dicts = DatasetCatalog.get(dataset)
    multi = [d for d in dicts if len(d["annotations"]) >= 2]
    uniq = next(d for d in multi if len({a["category_id"] for a in d["annotations"]}) == len(d["annotations"]))
    repeated = next((d for d in multi if len({a["category_id"] for a in d["annotations"]}) < len(d["annotations"])),
                    None)
    taken = {uniq["image_id"], repeated["image_id"] if repeated is not None else None}
    short = next(d for d in multi if d["image_id"] not in taken)

    def edit(d, payload):
        if d["image_id"] == uniq["image_id"]:  # reversed order, unique classes: still certain
            return {"mask_tokens": payload["mask_tokens"].flip(0), "classes": payload["classes"][::-1]}
        if repeated is not None and d["image_id"] == repeated["image_id"]:
            # same multiset, but two boxes of one class could be swapped: refused
            c = payload["classes"]
            i = next(i for i in range(len(c)) if c.count(c[i]) > 1)
            j = next(j for j in range(len(c)) if c[j] != c[i])
            c[i], c[j] = c[j], c[i]
            return {"mask_tokens": payload["mask_tokens"], "classes": c}
        if d["image_id"] == short["image_id"]:  # a token missing: refused
            return {"mask_tokens": payload["mask_tokens"][:-1], "classes": payload["classes"][:-1]}

    released = str(tmp_path / "released")
    tokens_of = _write_release(os.path.join(released, "mine"), dicts, edit)
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache)
    summary = import_released_tokens(cfg, dataset, released, cache, source_folder="mine", allow_other_sam=True)
    bad = {short["file_name"]} | ({repeated["file_name"]} if repeated is not None else set())
    assert set(summary.failed) == bad
    assert all("not certain" in why for why in summary.failed.values())
    assert summary.images == len(dicts) - len(bad)

    folder = token_cache_folder(cache, dataset, "tiny")
    mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=dataset)
    for d in dicts:
        if d["file_name"] in bad:
            assert not os.path.exists(token_file(folder, d["image_id"]))
            continue
        x = mapper(d)  # cached training accepts the file (same annotations, same SAM id)
        expected = tokens_of[d["image_id"]]  # in annotation order: token i belongs to box i
        torch.testing.assert_close(x["sam_tokens"].float(), expected[: len(x["sam_tokens"])])
        assert x["instances"].gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]

    # A re-run skips what was imported and still refuses the bad files.
    again = import_released_tokens(cfg, dataset, released, cache, source_folder="mine", allow_other_sam=True)
    assert again.skipped == summary.images and again.images == 0 and set(again.failed) == bad


def test_class_id_convention_is_detected_or_refused(dataset, tmp_path):
    dicts = DatasetCatalog.get(dataset)
    released = str(tmp_path / "released")
    _write_release(os.path.join(released, "shifted"), dicts,
                   lambda d, p: {"mask_tokens": p["mask_tokens"], "classes": [c - 1 for c in p["classes"]]})
    cache = str(tmp_path / "cache")
    summary = import_released_tokens(_cfg(cache), dataset, released, cache, source_folder="shifted",
                                     allow_other_sam=True)  # 0-based ids: the "contiguous" convention
    assert not summary.failed and summary.images == len(dicts)
    _write_release(os.path.join(released, "foreign"), dicts,
                   lambda d, p: {"mask_tokens": p["mask_tokens"], "classes": [c + 7 for c in p["classes"]]})
    with pytest.raises(ValueError, match="no class-id convention"):
        import_released_tokens(_cfg(cache), dataset, released, str(tmp_path / "c2"), source_folder="foreign",
                               allow_other_sam=True)


def test_other_sam_is_refused_without_the_flag(dataset, tmp_path):
    with pytest.raises(ValueError, match="SAM ViT-B"):
        import_released_tokens(_cfg(str(tmp_path)), dataset, str(tmp_path), str(tmp_path), source_folder="x")


def test_cli_names_bad_files_and_exits_1(dataset, tmp_path):
    tool = load_tool("import_sam_tokens")
    dicts = DatasetCatalog.get(dataset)
    released = str(tmp_path / "released")
    _write_release(os.path.join(released, "cli"), dicts)
    os.remove(os.path.join(released, "cli", f"{dicts[0]['image_id']}.pth"))
    cache = str(tmp_path / "cache")
    rc = tool.main(["--config-file", TINY_CONFIG, "--released-root", released, "--source-folder", "cli",
                    "--dataset", dataset, "--output", cache, "--allow-other-sam", "MODEL.DEVICE", "cpu"])
    assert rc == 1
    folder = token_cache_folder(cache, dataset, "tiny")
    assert len(os.listdir(folder)) == len(dicts) - 1
    payload = load_tokens(token_file(folder, dicts[1]["image_id"]), dicts[1]["image_id"])
    assert payload["tokens"].shape == (len(dicts[1]["annotations"]), 32)


def test_tokens_of_another_width_are_refused_at_import_and_named_in_cached_training(dataset, tmp_path, capsys):
    """A 24-d file among 32-d ones is refused by the tool, naming it and both widths; a whole cache
    of another SAM's width stops cached training with the file and both widths, not a matmul error."""
    tool = load_tool("import_sam_tokens")
    dicts = DatasetCatalog.get(dataset)
    odd = dicts[2]

    def narrow(d, payload):
        if d["image_id"] == odd["image_id"]:
            return {"mask_tokens": payload["mask_tokens"][:, :24], "classes": payload["classes"]}

    released = str(tmp_path / "released")
    _write_release(os.path.join(released, "mixed"), dicts, narrow)
    cache = str(tmp_path / "cache")
    rc = tool.main(["--config-file", TINY_CONFIG, "--released-root", released, "--source-folder", "mixed",
                    "--dataset", dataset, "--output", cache, "--allow-other-sam", "MODEL.DEVICE", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    odd_file = os.path.join(released, "mixed", f"{odd['image_id']}.pth")
    line = next(l for l in out.splitlines() if odd_file in l)
    assert "24-d tokens" in line and "32-d tokens" in line
    folder = token_cache_folder(cache, dataset, "tiny")
    assert not os.path.exists(token_file(folder, odd["image_id"])) and len(os.listdir(folder)) == len(dicts) - 1

    # Every file 48-d (tokens of another SAM, imported on purpose): training with the tiny SAM (32-d)
    # names a cache file and both widths.
    import train_net
    from detectron2.engine import default_argument_parser

    def widen(d, payload):
        return {"mask_tokens": torch.cat([payload["mask_tokens"]] * 2, 1)[:, :48], "classes": payload["classes"]}

    _write_release(os.path.join(released, "wide"), dicts, widen)
    wide_cache = str(tmp_path / "wide_cache")
    assert tool.main(["--config-file", TINY_CONFIG, "--released-root", released, "--source-folder", "wide",
                      "--dataset", dataset, "--output", wide_cache, "--allow-other-sam", "MODEL.DEVICE", "cpu"]) == 0
    args = default_argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST", "()", "MODEL.REGIONSPOT.TOKEN_MODE", "cached",
        "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", wide_cache, "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2",
        "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", *NO_RESIZE])
    with pytest.raises(ValueError) as info:
        train_net.main(args)
    message = str(info.value)
    assert "48-d tokens" in message and "32-d tokens" in message
    assert os.path.join(wide_cache, dataset, "tiny") in message and ".pth" in message
