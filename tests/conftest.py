"""Shared fixtures: tiny random SAM and CLIP, and a synthetic LVIS-format dataset in a temp folder."""
import functools
import http.server
import importlib.util
import json
import os
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train_net.py is importable from tests (load tools/ scripts by path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from conftest import` in tests/<layer>/

warnings.filterwarnings("ignore", category=UserWarning, module="clip")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from detectron2.config import get_cfg  # noqa: E402

import regionspot  # noqa: E402,F401
from regionspot import add_regionspot_config  # noqa: E402
from regionspot.data.dataset_mapper import RegionSpotDatasetMapper  # noqa: E402
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs")
# Subprocesses and waits in the tests only guard against a hang: the limit is far above what any
# run needs on a slow or busy machine, so no test fails for being slow.
HANG_TIMEOUT_S = 3600
# Unit tests use the quickstart model with *random* tiny encoders (fast, and independent of the
# shipped pretrained files); tests of the quickstart itself use its own config.
TINY_CONFIG = os.path.join(CONFIG_DIR, "quickstart", "RegionSpot-tiny-random_synthetic.yaml")
QUICKSTART_CONFIG = os.path.join(CONFIG_DIR, "quickstart", "RegionSpot-tiny_synthetic.yaml")
PLUGIN_CONFIG = os.path.join(CONFIG_DIR, "plugins", "RegionSpot-BL_rpn_R_50_FPN_lvis.yaml")
# The shipped plug-in config with the tests' tiny encoders, a random small detector and unresized images.
PLUGIN_TINY = ("MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
               "MODEL.REGIONSPOT.SAM.TYPE", "tiny", "MODEL.REGIONSPOT.CLIP.NAME", "tiny",
               "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", "128", "MODEL.REGIONSPOT.TEXT.TEMPLATES", "single",
               "MODEL.REGIONSPOT.HEAD.DIM_FEEDFORWARD", "256", "INPUT.MIN_SIZE_TEST", "0",
               "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "SOLVER.AMP.ENABLED", "False",
               "DATALOADER.NUM_WORKERS", "0", "MODEL.REGIONSPOT.USE_PROPOSAL_SCORE", "False")


def load_tool(name: str):
    """tools/<name>.py as a module (loaded by path: a `tools` package elsewhere may shadow it)."""
    spec = importlib.util.spec_from_file_location(f"regionspot_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own text-embedding cache, so cache hits are never inherited."""
    monkeypatch.setenv("REGIONSPOT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(folder, base URL, stop()) of an http server on 127.0.0.1 serving `folder` (tmp_path/served),
    with proxies off and iopath's download cache isolated in tmp_path/iopath_cache."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # iopath caches URL downloads under $FVCORE_CACHE (see iopath.common.file_io.get_cache_dir).
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath_cache"))
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            thread.join(5)
            stopped.append(True)

    yield folder, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()



def tiny_cfg(*opts):
    """A frozen config of the tiny quickstart model on the CPU, plus `opts`."""
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def synthetic_val(synthetic_root):
    """A registered 6-image synthetic LVIS-format set: its dataset name."""
    name = "test_synthetic_val"
    json_path = make_synthetic_lvis(synthetic_root, "val", num_images=6, seed=3)
    register_synthetic_lvis(name, json_path, synthetic_root)
    return name


@pytest.fixture(scope="session")
def quickstart_head(tmp_path_factory):
    """A head checkpoint (random but fixed weights) for the quickstart's tiny pretrained encoders:
    two processes that load it run the same model (the web demo's tests)."""
    from regionspot.checkpoint import RegionSpotCheckpointer

    folder = tmp_path_factory.mktemp("quickstart_head")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        cfg = get_cfg()
        add_regionspot_config(cfg)
        cfg.merge_from_file(QUICKSTART_CONFIG)
        cfg.MODEL.DEVICE = "cpu"
        RegionSpotCheckpointer(build_model(cfg), str(folder)).save("head")
    return str(folder / "head.pth")


@pytest.fixture(scope="session")
def shapes_image(tmp_path_factory):
    """A 160x120 synthetic shapes image with 3 shapes: (its path, [(class, XYXY box)])."""
    import json

    from regionspot.data.synthetic import DEFAULT_CLASSES

    root = str(tmp_path_factory.mktemp("shapes_image"))
    data = json.load(open(make_synthetic_lvis(root, "val", num_images=1, seed=12, image_size=(120, 160))))
    shapes = [(DEFAULT_CLASSES[a["category_id"] - 1],
               BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)) for a in data["annotations"]]
    return os.path.join(root, "val", "val_00000.png"), shapes


HEAD_TO_ORIGINAL = (("head.", "model."), ("sam_encoder.sam.", "model.sam."),
                    ("clip_encoder.clip_model.", "model.clip_model."))


def _original_layout(state):
    out = {}
    for k, v in state.items():
        for ours, theirs in HEAD_TO_ORIGINAL:
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v.detach().clone()
                break
        else:
            raise AssertionError(k)
    return out


def _gt_by_image(dataset):
    """image_id -> (XYXY boxes (N, 4) float64, contiguous 0-based classes) from the dataset dicts."""
    out = {}
    for d in DatasetCatalog.get(dataset):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
        out[d["image_id"]] = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                              [a["category_id"] for a in d["annotations"]])
    return out


def gt_proposals_file(tmp_path, dataset) -> str:
    """A per-image proposals JSON ({image_id: {boxes, scores}}) holding `dataset`'s gt boxes."""
    path = tmp_path / "gt_proposals.json"
    gt = _gt_by_image(dataset)
    path.write_text(json.dumps({str(i): {"boxes": b.tolist(), "scores": [1.0] * len(b)} for i, (b, _) in gt.items()}))
    return str(path)


def make_oracle_checkpoint(cfg, dataset: str, path, original_layout: bool = True) -> str:
    """Write a checkpoint of the model `cfg` builds whose head is an oracle on `dataset`: every gt
    region gets its own class on top (see test_eval_e2e.py's docstring). `original_layout` writes
    the original release's key names (SAM ViT / OpenAI CLIP only); else our own."""
    torch.manual_seed(1234)
    model = build_model(cfg).eval()
    head = model.head
    with torch.no_grad():
        for layer in head.decoder.layers:
            for attn in (layer.self_attn, layer.multihead_attn):
                attn.out_proj.weight.zero_()
                attn.out_proj.bias.zero_()
            layer.linear2.weight.zero_()
            layer.linear2.bias.zero_()
        for m in head.modules():
            if isinstance(m, torch.nn.LayerNorm):  # as built; the construction relies on it
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)

    # The region tokens exactly as the evaluation computes them: same mapper, one image a batch.
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=dataset)
    feats, labels, per_image = [], [], []
    for d in DatasetCatalog.get(dataset):
        x = mapper(d)
        sam_emb, _, clip_tokens = model.encode_images([x["image"]])
        tokens, _ = model.decode_regions(sam_emb[0], tuple(x["image"].shape[-2:]), boxes=x["instances"].gt_boxes.tensor)
        with torch.no_grad():
            h = head.decoder(head.to_clip(tokens)[None], clip_tokens)[0]
            h_ln = F.layer_norm(head.to_clip(tokens), (h.shape[-1],))
        torch.testing.assert_close(h, h_ln, atol=1e-3, rtol=1e-3)  # the head is LN(to_clip(.)) now
        feats.append(h.double())
        labels.append(x["instances"].gt_classes)
        per_image.append((x, tokens, clip_tokens))
    H, y = torch.cat(feats), torch.cat(labels)
    names, T = model.text_embeddings(dataset)
    num_regions, width = H.shape
    assert num_regions < width + 1, "too many regions for an exact least-squares fit"
    assert len(set(y.tolist())) >= 3  # several classes: the rankings are a real test

    targets = (torch.linalg.pinv(T.double()) @ F.one_hot(y, len(names)).double().T).T  # (R, D)
    A = torch.cat([H, torch.ones(num_regions, 1, dtype=H.dtype)], dim=1)
    sol = torch.linalg.lstsq(A, targets, driver="gelsd").solution  # (W + 1, D)
    assert torch.allclose(A @ sol, targets, atol=1e-6)
    with torch.no_grad():
        head.projector.weight.copy_(sol[:-1].T.float())
        head.projector.bias.copy_(sol[-1].float())

    # Sanity of the construction (in-process): every region's own class wins.
    for (x, tokens, clip_tokens) in per_image:
        with torch.no_grad():
            logits = model.classify(model.embed_regions([tokens], clip_tokens)[0], T)
        assert torch.equal(logits.argmax(1), x["instances"].gt_classes)

    state = model.state_dict()
    torch.save({"model": _original_layout(state) if original_layout else state}, path)
    return str(path)


@pytest.fixture(scope="session")
def oracle(synthetic_val, tmp_path_factory):
    """Path of an original-layout checkpoint (head + frozen SAM/CLIP) of an oracle head on
    `synthetic_val` for the tiny model (`make_oracle_checkpoint`)."""
    folder = tmp_path_factory.mktemp("oracle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGIONSPOT_CACHE", str(folder / "cache"))
        return make_oracle_checkpoint(tiny_cfg(), synthetic_val, folder / "oracle_original_layout.pth")
