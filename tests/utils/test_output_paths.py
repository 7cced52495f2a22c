"""Bad output paths are refused before any work starts, with exit code 2 and the path named, by
tools/demo.py, tools/dump_text_embeddings.py and tools/extract_sam_tokens.py."""
import importlib.util
import os
import subprocess
import sys

import pytest

from regionspot.data.synthetic import make_synthetic_lvis

from conftest import HANG_TIMEOUT_S, ROOT, TINY_CONFIG


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"regionspot_tool_{name}_paths", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo, dump, extract = (_load_tool(n) for n in ("demo", "dump_text_embeddings", "extract_sam_tokens"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("paths"))
    make_synthetic_lvis(root, "val", num_images=2, seed=5, image_size=(64, 80))
    return os.path.join(root, "val")


@pytest.fixture
def no_work(monkeypatch):
    """Building a model is work: the path checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the output paths were checked")
    monkeypatch.setattr(demo, "RegionSpotPredictor", refuse)
    monkeypatch.setattr(dump, "build_clip_encoder", refuse)
    monkeypatch.setattr(extract, "build_sam_encoder", refuse)


def test_demo_cli_unwritable_json_output_exits_2_before_any_image(images, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder is needed")
    bad = blocker / "out.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--config-file", TINY_CONFIG, "--input", images,
         "--sam-auto", "--json-output", str(bad), "--opts", "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=dict(os.environ, REGIONSPOT_CACHE=str(tmp_path / "c")),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--json-output {bad}: {blocker} is a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and "RegionSpot demo" not in proc.stderr  # no image was processed


@pytest.mark.parametrize("case", ["output_is_a_file", "output_under_a_file", "json_is_a_folder"])
def test_demo_bad_outputs_exit_2(images, tmp_path, capsys, no_work, case):
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"x")
    args = {"output_is_a_file": ["--output", str(a_file)],  # two images: --output must be a folder
            "output_under_a_file": ["--output", str(a_file / "vis")],
            "json_is_a_folder": ["--json-output", str(tmp_path)]}[case]
    code = demo.main(["--config-file", TINY_CONFIG, "--input", images, "--sam-auto", *args,
                      "--opts", "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"demo.py: error: {args[0]} {args[1]}" in err


def test_demo_single_image_picture_file_is_accepted(images, tmp_path, monkeypatch):
    """One image and an image file name: --output is that picture, not a folder."""
    one = os.path.join(images, sorted(os.listdir(images))[0])
    args = demo.get_parser().parse_args(["--config-file", TINY_CONFIG, "--input", one, "--sam-auto",
                                         "--output", str(tmp_path / "new" / "pic.png")])
    demo.check_outputs(args, single=True)  # no error: the folder can be made
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "pic.png").mkdir()  # now a folder of that name: pictures go inside
    demo.check_outputs(args, single=True)


@pytest.mark.parametrize("case", ["under_a_file", "a_folder"])
def test_dump_text_embeddings_bad_output_exits_2(tmp_path, capsys, no_work, case):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    out = {"under_a_file": str(a_file / "emb.pth"), "a_folder": str(tmp_path)}[case]
    code = dump.main(["--config-file", TINY_CONFIG, "--vocabulary", "custom", "--custom-vocabulary", "cat,dog",
                      "--output", out, "--opts", "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"--output {out}" in err


def test_extract_sam_tokens_bad_output_exits_2(tmp_path, capsys, no_work):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    args = extract.parse_args(["--config-file", TINY_CONFIG, "--output", str(a_file), "MODEL.DEVICE", "cpu"])
    with pytest.raises(SystemExit) as info:
        extract.main(args)
    assert info.value.code == 2 and f"--output {a_file} is a file" in capsys.readouterr().err
