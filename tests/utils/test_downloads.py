"""Downloads (MODEL.WEIGHTS, SAM and CLIP checkpoints, CLIP by name) from a local HTTP server on
127.0.0.1 that the test starts and stops: fetched once and cached, and a 404, a refused connection
or a server that never answers fails (within the timeout) naming the key, the URL and the fix."""
import concurrent.futures
import hashlib
import http.server
import os
import socket
import threading
import warnings

import clip
import pytest
import torch
from detectron2.modeling import build_model

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.modeling.encoders.clip_encoder import build_clip
from regionspot.modeling.encoders.sam_encoder import build_sam, build_tiny_sam
from regionspot.utils.weights import DOWNLOAD_TIMEOUT_ENV, DownloadError, download_timeout

from conftest import HANG_TIMEOUT_S, tiny_cfg


class _Server:
    """Serves `files` (URL path -> bytes) and counts requests per path; anything else is a 404."""

    def __init__(self):
        self.files, self.hits = {}, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "download_cache"))  # iopath's cache, isolated
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def silent_server():
    """Accepts connections (the kernel's backlog does) but never answers a request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _bytes_of(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_model_weights_url_is_downloaded_once_and_cached(server):
    model = build_model(tiny_cfg())
    state = {k: v + 1.0 for k, v in model.state_dict().items() if k.startswith("head.")}
    server.files["/ckpt/regionspot_tiny.pth"] = _bytes_of({"model": state})
    url = server.url + "/ckpt/regionspot_tiny.pth"
    for _ in range(2):  # a fresh model and checkpointer each time: the second load reads the cache
        model = build_model(tiny_cfg())
        RegionSpotCheckpointer(model).load(url)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert server.hits == {"/ckpt/regionspot_tiny.pth": 1}
    assert os.path.isfile(os.path.join(os.environ["FVCORE_CACHE"], "ckpt", "regionspot_tiny.pth"))


def test_sam_checkpoint_url_404_names_key_url_and_fix(server):
    url = server.url + "/sam/missing.pth"
    with pytest.raises(DownloadError) as info:
        build_sam("tiny", url)
    msg = str(info.value)
    assert "MODEL.REGIONSPOT.SAM.CHECKPOINT" in msg and url in msg and "404" in msg
    assert "Download the file yourself and set MODEL.REGIONSPOT.SAM.CHECKPOINT to its local path" in msg
    cache = os.environ["FVCORE_CACHE"]
    assert not any(files for _, _, files in os.walk(cache) if any(not f.endswith(".lock") for f in files))


def test_sam_checkpoint_url_works(server):
    sam = build_tiny_sam()
    server.files["/sam/tiny.pth"] = _bytes_of(sam.state_dict())
    loaded = build_sam("tiny", server.url + "/sam/tiny.pth", seed=123)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam.state_dict().values()))


def test_refused_connection_names_model_weights(server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.pth"
    with pytest.raises(DownloadError, match=r"\(MODEL.WEIGHTS\) from " + url + ".*[Rr]efused.*set MODEL.WEIGHTS"):
        RegionSpotCheckpointer(build_model(tiny_cfg())).load(url)


def test_server_that_never_answers_times_out(server, silent_server, monkeypatch):
    monkeypatch.setenv(DOWNLOAD_TIMEOUT_ENV, "0.5")
    url = silent_server + "/weights/x.pth"
    # Run in a thread so that a hang fails the test instead of blocking the suite.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(build_sam, "tiny", url)
        with pytest.raises(DownloadError) as info:
            future.result(timeout=HANG_TIMEOUT_S)
    msg = str(info.value)
    assert url in msg and "no answer within 0.5 s" in msg and DOWNLOAD_TIMEOUT_ENV in msg
    assert "MODEL.REGIONSPOT.SAM.CHECKPOINT" in msg


def test_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv(DOWNLOAD_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=DOWNLOAD_TIMEOUT_ENV):
        download_timeout()
    monkeypatch.delenv(DOWNLOAD_TIMEOUT_ENV)
    assert download_timeout() == 60.0


def _traced_tiny_clip() -> bytes:
    """A tiny CLIP as a JIT archive, the format of OpenAI's files."""
    model = build_clip("tiny", "random", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    import io
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def test_clip_by_name_downloads_once_checks_sha256_and_names_clip_on_failure(server, tmp_path, monkeypatch):
    data = _traced_tiny_clip()
    sha = hashlib.sha256(data).hexdigest()
    path = f"/clip/models/{sha}/ViT-B-16.pt"
    server.files[path] = data
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16", server.url + path)
    root = str(tmp_path / "clip_root")
    for _ in range(2):
        model = build_clip("ViT-B/16", "", download_root=root)
        assert model.visual.conv1.out_channels == 64  # the served (tiny) file, not a ViT-B/16
    assert server.hits == {path: 1} and sorted(os.listdir(root)) == ["ViT-B-16.pt", "ViT-B-16.pt.lock"]
    # A file that is not the one the URL's checksum names is refused and not kept.
    bad = f"/clip/models/{'0' * 64}/ViT-B-16.pt"
    server.files[bad] = data
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16", server.url + bad)
    with pytest.raises(DownloadError, match="SHA256"):
        build_clip("ViT-B/16", "", download_root=str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == ["ViT-B-16.pt.lock"]
    # A failed download names CLIP, both keys, the URL and where the file may go instead.
    missing = server.url + f"/clip/models/{sha}/gone.pt"
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16", missing)
    with pytest.raises(DownloadError) as info:
        build_clip("ViT-B/16", "", download_root=str(tmp_path / "third"))
    msg = str(info.value)
    assert "CLIP ViT-B/16" in msg and missing in msg and "404" in msg
    assert "set MODEL.REGIONSPOT.CLIP.CHECKPOINT to its local path" in msg and "MODEL.REGIONSPOT.CLIP.NAME" in msg


def test_clip_checkpoint_url_404_names_its_key(server):
    url = server.url + "/clip/none.pt"
    with pytest.raises(DownloadError, match=r"\(MODEL.REGIONSPOT.CLIP.CHECKPOINT\) from " + url):
        build_clip("ViT-B/16", url)
