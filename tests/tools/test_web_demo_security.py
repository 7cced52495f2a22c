"""tools/web_demo.py never opens a server path a visitor typed unless the operator allowed its
folder (--allow-paths, links resolved); the Model panel is off unless --allow-model-change, and the
server refuses it even to a process that posts the event's fn_index; a file that is not a config
is named; SIGTERM removes the temporary folder as Ctrl-C does. Over HTTP with gradio_client on
127.0.0.1 only; a visitor from another address is checked by calling the server's own check."""
import html
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import QUICKSTART_CONFIG, ROOT, load_tool

web_demo = load_tool("web_demo")
QUICKSTART_NAME = "quickstart/RegionSpot-tiny_synthetic.yaml"


class MakesFolder:
    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (self.folder,)


@pytest.fixture
def folders(tmp_path):
    """(allowed folder, a folder outside it): a names file in each, a link from inside to outside."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "names.txt").write_text("red_circle\ngreen_square\n")
    (outside / "secret.txt").write_text("alpha\nbeta\n")
    os.symlink(outside / "secret.txt", allowed / "link.txt")
    (allowed / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return allowed, outside


def _serve(head, *extra):
    return web_demo.serve(["--port", "0", "--weights", head, "--no-examples", *extra, "--opts", "MODEL.DEVICE", "cpu"],
                          block=False)


def _client(url, tmp_path):
    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def _classes(table):
    return {row[3] for row in table["data"]}


def _load_model_call(client):
    """Call the page-only "Load model" event by its fn_index, as a local process posting to the
    queue would: gradio_client hides private events, so its own guard is lifted for this call."""
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in client.config["components"]}
    index = next(i for i, d in enumerate(client.config["dependencies"])
                 if [ids.get(x) for x in d["inputs"]] == ["config_file", "weights", "opts"])
    client.endpoints[index].is_valid = True

    def call(config, weights, opts=""):
        try:
            return client.predict(config, weights, opts, fn_index=index)
        except AppError as e:
            return html.unescape(str(e))
    return call


def test_vocabulary_box_reads_files_only_under_allowed_folders(quickstart_head, folders, shapes_image, tmp_path):
    allowed, outside = folders
    app, url = _serve(quickstart_head, "--allow-paths", str(allowed))
    try:
        client = _client(url, tmp_path)
        image = handle_file(shapes_image[0])

        def classes(vocabulary):
            return _classes(client.predict(image, "box 10 10 60 60", vocabulary, False, 3, 0, api_name="/predict")[1])

        secret = str(outside / "secret.txt")
        assert classes(secret) == {secret}  # the typed text, never the file's lines
        link = str(allowed / "link.txt")
        assert classes(link) == {link}  # a link out of the allowed folder is outside it
        assert classes("/etc/passwd") == {"/etc/passwd"}
        assert classes(str(allowed / "names.txt")) <= {"red_circle", "green_square"}  # allowed: read
        assert len(classes(str(allowed / "names.txt"))) == 2
        assert classes("missing_vocabulary.pth") == {"missing_vocabulary.pth"}  # outside: a name
        with pytest.raises(AppError, match="Text-embedding file not found"):  # inside: the file is read
            classes(str(allowed / "missing_vocabulary.pth"))
    finally:
        app.close()


def test_model_panel_is_off_by_default_even_by_fn_index(quickstart_head, folders, tmp_path):
    allowed, _ = folders
    hostile = allowed / "hostile.pth"
    torch.save({"model": {}, "x": MakesFolder(str(tmp_path / "ran"))}, hostile)
    app, url = _serve(quickstart_head, "--allow-paths", str(allowed))
    try:
        call = _load_model_call(_client(url, tmp_path))
        message = call(QUICKSTART_NAME, str(hostile))
        assert isinstance(message, str) and "does not let the page load other models" in message
        assert "--allow-model-change" in message
        assert not (tmp_path / "ran").exists()
    finally:
        app.close()


def test_model_panel_loads_only_allowed_configs_and_weights(quickstart_head, folders, tmp_path):
    allowed, outside = folders
    head_inside = allowed / "head.pth"
    head_inside.write_bytes(open(quickstart_head, "rb").read())
    (outside / "head.pth").write_bytes(head_inside.read_bytes())
    hostile = allowed / "hostile.pth"
    torch.save({"model": {}, "x": MakesFolder(str(tmp_path / "ran"))}, hostile)
    app, url = _serve(quickstart_head, "--allow-paths", str(allowed), "--allow-model-change")
    try:
        call = _load_model_call(_client(url, tmp_path))
        refused = call(QUICKSTART_NAME, str(outside / "head.pth"))
        assert str(outside / "head.pth") in refused and "127.0.0.1" in refused and "--allow-paths" in refused
        refused = call(str(outside / "secret.txt"), "")
        assert str(outside / "secret.txt") in refused and "opens no server file" in refused
        refused = call(QUICKSTART_NAME, "", f"MODEL.REGIONSPOT.SAM.CHECKPOINT {outside / 'sam.pth'}")
        assert "Config override MODEL.REGIONSPOT.SAM.CHECKPOINT" in refused
        not_config = call(str(allowed / "passwd"), "")
        assert str(allowed / "passwd") in not_config and "expected a YAML mapping of config keys" in not_config
        assert "'str' object has no attribute" not in not_config
        unsafe = call(QUICKSTART_NAME, str(hostile))
        assert "Refused to load" in unsafe and "posix.mkdir" in unsafe and not (tmp_path / "ran").exists()
        loaded = call(QUICKSTART_NAME, str(head_inside))
        assert isinstance(loaded, tuple) and str(head_inside) in loaded[0]  # the model line names the new head
    finally:
        app.close()


def test_the_servers_check_refuses_a_visitor_from_another_address(quickstart_head, folders):
    allowed, outside = folders
    demo = web_demo.WebDemo(weights=quickstart_head, opts=["MODEL.DEVICE", "cpu"], allow_paths=[str(allowed)],
                            allow_model_change=True)
    remote = SimpleNamespace(client=SimpleNamespace(host="192.0.2.7"))
    with pytest.raises(web_demo.DemoError) as info:
        demo.access.check_model_request(QUICKSTART_NAME, str(outside / "secret.txt"), [], remote)
    assert "192.0.2.7" in str(info.value) and str(outside / "secret.txt") in str(info.value)
    with pytest.raises(web_demo.DemoError, match="192.0.2.7"):
        demo.access.check_model_request("/etc/passwd", "", [], remote)
    assert demo.access.check_model_request(QUICKSTART_NAME, quickstart_head, [], remote).endswith(
        os.path.join("quickstart", "RegionSpot-tiny_synthetic.yaml"))  # the server's own head: allowed
    # The vocabulary box's check is the same for every address: typed paths outside are names.
    secret = str(outside / "secret.txt")
    assert web_demo.vocabulary_from_text(secret, may_open=demo.access.may_open) == ([secret], None)
    # ... and with model changes off, the server refuses any model request, from anywhere.
    demo.access.allow_model_change = False
    with pytest.raises(web_demo.DemoError, match="does not let the page load other models"):
        demo.access.check_model_request(QUICKSTART_NAME, quickstart_head, [], remote)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_removes_the_temporary_folder(quickstart_head, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = _free_port()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "projects", "RegionSpot"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "web_demo.py"), "--port", str(port),
                             "--weights", quickstart_head, "--no-examples", "--opts", "MODEL.DEVICE", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a bound on the wait for start-up, not a speed check
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        made = [p for p in os.listdir(tmp) if p.startswith("regionspot_web_")]
        assert len(made) == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        assert not os.path.exists(tmp / made[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_image_path_that_was_not_uploaded_is_refused(quickstart_head, tmp_path):
    """The image inputs take uploads only: a request naming a server file as the image is refused
    by Gradio's own check, so the page never reads it."""
    import json

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n not uploaded")
    app, url = _serve(quickstart_head)
    try:
        call = url + "gradio_api/call/set_image"
        body = json.dumps({"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]}).encode()
        request = urllib.request.Request(call, data=body, headers={"Content-Type": "application/json"})
        event = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
        answer = urllib.request.urlopen(f"{call}/{event}", timeout=60).read().decode()
        # Refused before the page's handler: it would have said "Cannot read the image secret.png".
        assert "event: error" in answer and "Cannot read the image" not in answer
    finally:
        app.close()
