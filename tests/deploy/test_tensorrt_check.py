"""tools/tensorrt_check.py (tools/gpu_check.sh's TensorRT step) without a GPU: its plumbing. The
dry run exports the tiny model and plans one fp16 engine per graph, with the box, point, class and
prompt axes as optimisation profiles read from the manifest; without TensorRT a real run says so."""
import json

from conftest import load_tool

tensorrt_check = load_tool("tensorrt_check")


def test_dry_run_plans_every_graph_with_dynamic_profiles(tmp_path, capsys):
    assert tensorrt_check.main([str(tmp_path), "--dry-run"]) == 0
    steps = json.loads((tmp_path / "tensorrt_plan.json").read_text())
    record = json.loads((tmp_path / "tensorrt.json").read_text())
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert record["status"] == "planned" and record["plan"] == steps
    assert [s["graph"] for s in steps] == ["sam_image", "clip_image", "region_decoder", "region_decoder",
                                           "region_head", "region_head", "text"]
    d, ctx, c = manifest["clip"]["text_dim"], manifest["text"]["context_length"], manifest["sam"]["token_dim"]
    decoder = [s for s in steps if s["graph"] == "region_decoder"]
    assert [s["profile"]["point_coords"]["opt"] for s in decoder] == [[12, 2, 2], [300, 2, 2]]
    for s in decoder:
        p = s["profile"]
        assert p["point_coords"]["min"] == [1, 1, 2] and p["point_coords"]["max"][0] == tensorrt_check.MAX_BOXES
        assert p["point_labels"]["opt"] == p["point_coords"]["opt"][:2]
        assert s["engine"] == decoder[0]["engine"]  # one engine holds both profiles
    head = [s for s in steps if s["graph"] == "region_head"]
    for s, n in zip(head, (12, 300)):
        assert s["profile"] == {"region_tokens": {"min": [1, c], "opt": [n, c], "max": [tensorrt_check.MAX_BOXES, c]},
                                "text_embeddings": {"min": [1, d], "opt": [1203, d], "max": [tensorrt_check.MAX_CLASSES, d]}}
    (text,) = [s for s in steps if s["graph"] == "text"]
    assert text["profile"]["tokens"]["opt"] == [81, ctx]
    cmd = head[1]["trtexec"]
    assert cmd[0] == "trtexec" and "--fp16" in cmd and f"--onnx={head[1]['onnx']}" in cmd
    assert f"--optShapes=region_tokens:300x{c},text_embeddings:1203x{d}" in cmd
    assert "--optShapes=point_coords:12x2x2,point_labels:12x2" in decoder[0]["trtexec"]
    (sam,) = [s for s in steps if s["graph"] == "sam_image"]
    assert sam["profile"] == {} and not any(a.startswith("--minShapes") for a in sam["trtexec"])
    assert capsys.readouterr().out.count("[tensorrt] trtexec") == len(steps)


def test_without_tensorrt_a_real_run_says_it_skipped(tmp_path, monkeypatch):
    assert tensorrt_check.main([str(tmp_path / "a"), "--dry-run"]) == 0
    monkeypatch.setattr(tensorrt_check, "find_tensorrt", lambda: None)
    assert tensorrt_check.main([str(tmp_path / "b"), "--folder", str(tmp_path / "a" / "onnx")]) == 0
    record = json.loads((tmp_path / "b" / "tensorrt.json").read_text())
    assert record["status"].startswith("skipped: TensorRT is not installed") and not record["results"]
    assert "skipped" in (tmp_path / "b" / "tensorrt.md").read_text()
