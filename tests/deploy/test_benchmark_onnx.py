"""tools/benchmark_onnx.py with the tiny encoders: every backend times every stage, int8's agreement
is reported, and --equality finds the exported folder equal to the PyTorch predictor."""
import json

import pytest

from conftest import load_tool

benchmark_onnx = load_tool("benchmark_onnx")


@pytest.mark.parametrize("interleave", [False, True])
def test_speed_reports_every_stage_of_every_backend(tmp_path, interleave):
    out = tmp_path / "speed.json"
    assert benchmark_onnx.main(["--tiny", "--backends", "eager", "onnxruntime", "int8", "--repeats", "1",
                                "--boxes", "3", "12", "--num-classes", "20", "--image-size", "160x120",
                                "--json", str(out)] + ["--interleave"] * interleave) == 0
    r = json.loads(out.read_text())
    assert r["interleaved"] is interleave
    assert set(r["seconds"]) == {"eager", "onnxruntime", "int8"}
    for stages in r["seconds"].values():
        assert set(stages) == {"sam_encoder", "clip_tower", "region_3", "region_12", "text"}
        assert all(v > 0 for v in stages.values())
    a = r["int8_agreement"]
    assert 0 <= a["one_minus_r"] < 0.1 and 0.5 <= a["top1_agreement"] <= 1


def test_equality_of_the_exported_folder(tmp_path):
    out = tmp_path / "eq.json"
    assert benchmark_onnx.main(["--tiny", "--equality", "--boxes", "50", "--image-size", "160x120",
                                "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["pairs"]["tiny"]
    for row in rows.values():
        assert row["one_minus_r"] <= 1e-6 and row["top1_agreement"] == 1.0 and row["min_mask_iou"] >= 0.999
    assert rows["boxes"]["regions"] == 50 and rows["points"]["regions"] == 8
