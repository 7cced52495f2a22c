"""No file a user is handed runs code: hostile pickles are refused (naming the file, where in it
and the class) through every entry point that reads one, before any of their code runs; the
files real users hold (trainer checkpoints, the original release's layout, detectron2 model-zoo
and proposal pickles) still load; REGIONSPOT_TRUST_PICKLES=1 loads the old way."""
import hashlib
import logging
import os
import pickle
import warnings

import clip
import numpy as np
import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import train_net
from regionspot.checkpoint import SafeDetectionCheckpointer
from regionspot.modeling.encoders.clip_encoder import build_clip
from regionspot.modeling.prompt_sources import load_detector
from regionspot.predictor import RegionSpotPredictor
from regionspot.utils.safe_load import TRUST_ENV, UnsafeFileError, pickle_load, torch_load

from conftest import CONFIG_DIR, PLUGIN_CONFIG, PLUGIN_TINY, TINY_CONFIG, load_tool, tiny_cfg

TINY_LAZY = os.path.join(CONFIG_DIR, "lazy", "RegionSpot-tiny_synthetic.py")
TINY_RANDOM = ("model.sam.checkpoint=random", "model.clip.checkpoint=random", "model.clip.input_size=128")
# A small detectron2 detector (model-zoo config, ResNet-18 trunk) for the detector prompt source.
DETECTOR = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
DETECTOR_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


class MakesFolder:
    """Unpickling this creates a folder: the proof that a loader ran a file's code."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (self.folder,)


def _head_state(seed=0):
    torch.manual_seed(seed)
    return {f"head.{k}": v for k, v in build_model(tiny_cfg()).head.state_dict().items()}


def _hostile_pth(path, folder, with_head=False):
    torch.save({"model": _head_state() if with_head else {}, "trainer": {"hook": MakesFolder(str(folder))}}, path)
    return str(path)


def _hostile_pkl(path, folder):
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones(3, np.float32)}, "__author__": "x", "blobs": [MakesFolder(str(folder))]},
                    f, protocol=2)
    return str(path)


def _assert_refused(info, path, folder, key=None, where=None):
    message = str(info.value)
    assert not os.path.exists(folder), "the file's code ran"
    assert str(path) in message and "posix.mkdir" in message and TRUST_ENV in message, message
    if key:
        assert f"({key})" in message, message
    if where:
        assert f"at {where}" in message, message


def _eval(*opts, config=TINY_CONFIG):
    return train_net.main(default_argument_parser().parse_args(["--config-file", config, "--eval-only", *opts]))


# ------------------------------------------------------------------------------ the loaders themselves
def test_loaders_refuse_naming_file_key_path_and_class(tmp_path):
    folder = tmp_path / "ran"
    pth, pkl = _hostile_pth(tmp_path / "a.pth", folder), _hostile_pkl(tmp_path / "a.pkl", folder)
    with pytest.raises(UnsafeFileError) as info:
        torch_load(pth, pth, "SOME.KEY")
    _assert_refused(info, pth, folder, "SOME.KEY", "['trainer']['hook']")
    with pytest.raises(UnsafeFileError) as info:
        pickle_load(pkl, key="OTHER.KEY")
    _assert_refused(info, pkl, folder, "OTHER.KEY", "['blobs'][0]")


def test_numpy_and_plain_data_load_in_both_numpy_spellings(tmp_path):
    data = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(1.5), "i": np.int64(3),
            "d": np.dtype("f2"), "set": {1, 2}, "t": (1, "x", None), "b": b"\x00\x01"}
    for protocol in (2, 4):
        raw = pickle.dumps(data, protocol=protocol)
        # numpy 1.x writes numpy.core.multiarray; numpy 2 writes numpy._core.multiarray (protocol 2
        # spells globals as text lines, so the old spelling can be written in place).
        blobs = [raw] + ([raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")] if protocol == 2 else [])
        assert protocol != 2 or b"numpy.core.multiarray\n" in blobs[1]
        for blob in blobs:
            (tmp_path / "x.pkl").write_bytes(blob)
            got = pickle_load(str(tmp_path / "x.pkl"))
            assert got.keys() == data.keys() and np.array_equal(got["a"], data["a"]) and got["a"].dtype == np.float32
            assert got["s"] == 1.5 and got["i"] == 3 and got["d"] == np.dtype("f2") and got["set"] == {1, 2}
            assert got["t"] == (1, "x", None) and got["b"] == b"\x00\x01"
    torch.save({"tensor": torch.ones(2), **data}, tmp_path / "x.pth")
    got = torch_load(str(tmp_path / "x.pth"))
    assert torch.equal(got["tensor"], torch.ones(2)) and np.array_equal(got["a"], data["a"]) and got["d"] == np.dtype("f2")


# ------------------------------------------------------------------------------ every entry point
def test_model_weights_pth_pkl_and_url_are_refused(tmp_path, synthetic_val, http_root):
    folder = tmp_path / "ran"
    pth, pkl = _hostile_pth(tmp_path / "w.pth", folder), _hostile_pkl(tmp_path / "w.pkl", folder)
    common = ("DATASETS.TEST", f'("{synthetic_val}",)', "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    for path in (pth, pkl):
        with pytest.raises(UnsafeFileError) as info:
            _eval("MODEL.WEIGHTS", path, *common)
        _assert_refused(info, path, folder, "MODEL.WEIGHTS")

    served, base, _ = http_root
    _hostile_pth(served / "remote.pth", folder)
    url = f"{base}/remote.pth"
    with pytest.raises(UnsafeFileError) as info:
        _eval("MODEL.WEIGHTS", url, *common)
    _assert_refused(info, "remote.pth", folder, "MODEL.WEIGHTS", "['trainer']['hook']")


def test_sam_checkpoint_is_refused(tmp_path, synthetic_val):
    folder = tmp_path / "ran"
    path = str(tmp_path / "sam.pth")
    torch.save({"image_encoder.x": torch.zeros(1), "evil": MakesFolder(str(folder))}, path)
    with pytest.raises(UnsafeFileError) as info:
        _eval("MODEL.REGIONSPOT.SAM.CHECKPOINT", path, "DATASETS.TEST", f'("{synthetic_val}",)',
              "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    _assert_refused(info, path, folder, "MODEL.REGIONSPOT.SAM.CHECKPOINT", "['evil']")


def test_roi_head_weights_are_refused_naming_their_key(tmp_path):
    folder = tmp_path / "ran"
    path = _hostile_pth(tmp_path / "head.pth", folder, with_head=True)
    with pytest.raises(UnsafeFileError) as info:
        _eval(*PLUGIN_TINY, "MODEL.REGIONSPOT.HEAD_WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "out"),
              config=PLUGIN_CONFIG)
    _assert_refused(info, path, folder, "MODEL.REGIONSPOT.HEAD_WEIGHTS")


def test_lazy_init_checkpoint_is_refused_naming_its_key(tmp_path, synthetic_val):
    folder = tmp_path / "ran"
    path = _hostile_pth(tmp_path / "init.pth", folder, with_head=True)
    with pytest.raises(UnsafeFileError) as info:
        _eval(f"dataloader.test.dataset.name={synthetic_val}", f"train.init_checkpoint={path}",
              f"train.output_dir={tmp_path / 'out'}", *TINY_RANDOM, config=TINY_LAZY)
    _assert_refused(info, path, folder, "train.init_checkpoint")


def test_proposal_pickle_is_refused(tmp_path, synthetic_val):
    folder = tmp_path / "ran"
    path = str(tmp_path / "proposals.pkl")
    with open(path, "wb") as f:
        pickle.dump({"ids": [1], "boxes": [np.zeros((1, 4))], "objectness_logits": [MakesFolder(str(folder))]}, f)
    with pytest.raises(UnsafeFileError) as info:
        _eval("MODEL.REGIONSPOT.PROMPT", "proposals", "DATASETS.PROPOSAL_FILES_TEST", f'("{path}",)',
              "DATASETS.TEST", f'("{synthetic_val}",)', "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    _assert_refused(info, path, folder, "DATASETS.PROPOSAL_FILES_TEST", "['objectness_logits'][0]")


def test_detector_weights_pkl_is_refused_and_a_model_zoo_pkl_loads(tmp_path, synthetic_val):
    folder = tmp_path / "ran"
    path = _hostile_pkl(tmp_path / "detector.pkl", folder)
    with pytest.raises(UnsafeFileError) as info:
        _eval("MODEL.REGIONSPOT.PROMPT", "detector", "MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE", DETECTOR,
              "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", path, "MODEL.REGIONSPOT.DETECTOR.OPTS", str(DETECTOR_OPTS),
              "DATASETS.TEST", f'("{synthetic_val}",)', "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    _assert_refused(info, path, folder, "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", "['blobs'][0]")

    # detectron2's model-zoo layout: {"model": {name: ndarray}, "__author__", "matching_heuristics"}.
    torch.manual_seed(1)
    source, _ = load_detector(DETECTOR, "random", DETECTOR_OPTS)
    zoo = {"model": {k: v.numpy() for k, v in source.state_dict().items()}, "__author__": "Detectron2 Model Zoo",
           "matching_heuristics": True}
    zoo_path = str(tmp_path / "model_final_test.pkl")
    with open(zoo_path, "wb") as f:
        pickle.dump(zoo, f, protocol=2)
    torch.manual_seed(2)
    loaded, _ = load_detector(DETECTOR, zoo_path, DETECTOR_OPTS)
    a, b = source.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(2)
    fresh, _ = load_detector(DETECTOR, "random", DETECTOR_OPTS)
    assert not torch.equal(fresh.state_dict()["backbone.bottom_up.stem.conv1.weight"],
                           a["backbone.bottom_up.stem.conv1.weight"])  # the load did something


def test_unknown_torchscript_clip_is_refused_a_released_one_loads(tmp_path, monkeypatch):
    model = build_clip("tiny", "random", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
        path = str(tmp_path / "clip.pt")
        torch.jit.save(traced, path)
    with pytest.raises(UnsafeFileError, match="TorchScript") as info:
        build_clip("tiny", path)
    assert path in str(info.value) and "MODEL.REGIONSPOT.CLIP.CHECKPOINT" in str(info.value)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setitem(clip.clip._MODELS, "released-test", f"https://example.invalid/{sha}/clip.pt")
    loaded = build_clip("tiny", path)
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)


def test_token_import_refuses_a_hostile_released_file(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis

    name = "safe_load_token_set"
    register_synthetic_lvis(name, make_synthetic_lvis(str(tmp_path / "data"), "train", num_images=2, seed=2),
                            str(tmp_path / "data"))
    try:
        folder = tmp_path / "ran"
        released = tmp_path / "released" / "x"
        released.mkdir(parents=True)
        for d in DatasetCatalog.get(name):
            torch.save({"mask_tokens": torch.zeros(len(d["annotations"]), 32),
                        "classes": [a["category_id"] + 1 for a in d["annotations"]],
                        "note": MakesFolder(str(folder))}, released / f"{d['image_id']}.pth")
        tool = load_tool("import_sam_tokens")
        with pytest.raises(UnsafeFileError) as info:
            tool.main(["--config-file", TINY_CONFIG, "--released-root", str(tmp_path / "released"),
                       "--source-folder", "x", "--dataset", name, "--output", str(tmp_path / "cache"),
                       "--allow-other-sam", "MODEL.DEVICE", "cpu"])
        _assert_refused(info, released, folder, where="['note']")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------ the opt-in
def test_trust_pickles_loads_the_old_way_with_a_warning(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "ran"
    path = _hostile_pth(tmp_path / "trusted.pth", folder, with_head=True)
    with pytest.raises(UnsafeFileError):
        RegionSpotPredictor(tiny_cfg("MODEL.WEIGHTS", path))
    assert not folder.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    with caplog.at_level(logging.WARNING):
        predictor = RegionSpotPredictor(tiny_cfg("MODEL.WEIGHTS", path))
    assert folder.exists()  # the file's code ran, as the user allowed
    assert any(TRUST_ENV in r.getMessage() and path in r.getMessage() for r in caplog.records)
    head = _head_state()
    assert all(torch.equal(predictor.model.state_dict()[k], v) for k, v in head.items())


def test_safe_detection_checkpointer_reads_a_caffe2_blobs_pickle(tmp_path):
    """detectron2's other .pkl shape (Caffe2/Detectron1 'blobs', momentum entries dropped)."""
    linear = torch.nn.Linear(2, 2)
    path = str(tmp_path / "c2.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"weight": np.full((2, 2), 3, np.float32), "bias": np.zeros(2, np.float32),
                               "weight_momentum": np.zeros((2, 2), np.float32)}}, f, protocol=2)
    data = SafeDetectionCheckpointer(linear, key="K")._load_file(path)
    assert data["__author__"] == "Caffe2" and sorted(data["model"]) == ["bias", "weight"]


def test_open_clip_checkpoint_is_refused_naming_the_class(tmp_path):
    from regionspot.modeling.encoders.open_clip_encoder import build_open_clip

    folder = tmp_path / "ran"
    path = str(tmp_path / "open_clip.pth")
    torch.save({**build_open_clip("tiny", seed=5).state_dict(), "extra": MakesFolder(str(folder))}, path)
    with pytest.raises(UnsafeFileError) as info:
        build_open_clip("tiny", checkpoint=path, input_size=64)
    _assert_refused(info, path, folder, "MODEL.REGIONSPOT.CLIP.CHECKPOINT", "['extra']")


def test_torchscript_as_sam_checkpoint_is_refused(tmp_path):
    from regionspot.modeling.encoders.sam_encoder import build_sam

    path = str(tmp_path / "sam_scripted.pth")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnsafeFileError, match="TorchScript archive") as info:
        build_sam("tiny", path)
    assert path in str(info.value) and "MODEL.REGIONSPOT.SAM.CHECKPOINT" in str(info.value)


def test_a_checkpoint_our_trainer_writes_loads_and_resumes(tmp_path, synthetic_val):
    """Model, optimizer (AdamW state), scheduler and iteration: all within the weights-only types."""
    out = str(tmp_path / "out")
    common = ["--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", out,
              "DATASETS.TRAIN", f'("{synthetic_val}",)', "DATASETS.TEST", "()", "MODEL.REGIONSPOT.TOKEN_MODE", "online",
              "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
              "INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "256"]
    train_net.main(default_argument_parser().parse_args([*common, "SOLVER.MAX_ITER", "2"]))
    ckpt = torch_load(os.path.join(out, "model_final.pth"))
    assert ckpt["trainer"]["iteration"] == 1 and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
    train_net.main(default_argument_parser().parse_args(["--resume", *common, "SOLVER.MAX_ITER", "3"]))
    assert torch_load(os.path.join(out, "model_final.pth"))["trainer"]["iteration"] == 2  # it resumed at 2


def test_text_embedding_and_token_cache_files_are_refused(tmp_path):
    from regionspot.data.token_cache import load_tokens

    folder = tmp_path / "ran"
    emb = str(tmp_path / "vocab.pth")
    torch.save({"format": "x", "embeddings": torch.zeros(1, 4), "names": ["a"], "x": MakesFolder(str(folder))}, emb)
    with pytest.raises(UnsafeFileError) as info:
        RegionSpotPredictor(tiny_cfg()).vocabulary_embeddings(emb)
    _assert_refused(info, emb, folder, where="['x']")
    tokens = str(tmp_path / "1.pth")
    torch.save({"format": "x", "tokens": torch.zeros(1, 4), "x": MakesFolder(str(folder))}, tokens)
    with pytest.raises(UnsafeFileError) as info:
        load_tokens(tokens, 1)
    _assert_refused(info, tokens, folder, where="['x']")
