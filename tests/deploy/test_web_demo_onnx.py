"""tools/web_demo.py --onnx DIR: the page's work on an exported folder gives what it gives on the
PyTorch model it was exported from (the tiny quickstart model), through the same code paths."""
import numpy as np
import pytest

from conftest import QUICKSTART_CONFIG, load_tool
from regionspot.demo.prompt_lines import Region
from regionspot.modeling.region_pipeline import find_pipeline
from regionspot.onnx_export import export_folder
from regionspot.predictor import RegionSpotPredictor

web_demo = load_tool("web_demo")


@pytest.fixture(scope="module")
def exported_quickstart(quickstart_head, tmp_path_factory):
    predictor = RegionSpotPredictor.from_config_file(QUICKSTART_CONFIG, weights=quickstart_head,
                                                     opts=["MODEL.DEVICE", "cpu"])
    folder = str(tmp_path_factory.mktemp("web_onnx") / "export")
    names, emb = predictor.vocabulary_embeddings()
    cfg = web_demo.get_regionspot_cfg(QUICKSTART_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", quickstart_head])
    export_folder(find_pipeline(predictor.model), cfg, folder, vocabulary=(names, emb.numpy()),
                  vocabulary_spec=predictor.default_vocabulary or "")
    return folder


def test_onnx_page_equals_the_pytorch_page(quickstart_head, exported_quickstart, shapes_image):
    path, shapes = shapes_image
    torch_demo = web_demo.WebDemo(weights=quickstart_head, opts=["MODEL.DEVICE", "cpu"])
    onnx_demo = web_demo.WebDemo(onnx=exported_quickstart)
    assert "onnxruntime" in onnx_demo.model_line() and exported_quickstart in onnx_demo.model_line()
    assert onnx_demo.default_vocabulary == torch_demo.default_vocabulary
    x0, y0, x1, y1 = shapes[0][1]
    regions = [Region(box=list(b)) for _, b in shapes] + [Region(points=[((x0 + x1) / 2, (y0 + y1) / 2, 1)])]
    for vocabulary in (torch_demo.default_vocabulary, "circle, square | box, triangle"):
        a = torch_demo.recognize(path, regions, vocabulary, top_k=3)
        b = onnx_demo.recognize(path, regions, vocabulary, top_k=3)
        assert a.names == b.names and len(a.instances) == len(b.instances) == len(regions)
        assert np.array_equal(a.instances.region_ids.numpy(), b.instances.region_ids.numpy())
        assert np.array_equal(a.instances.topk_classes.numpy(), b.instances.topk_classes.numpy())
        assert np.allclose(a.instances.topk_scores.numpy(), b.instances.topk_scores.numpy(), atol=1e-5)
        assert np.allclose(a.instances.pred_boxes.tensor.numpy(), b.instances.pred_boxes.tensor.numpy(), atol=1e-3)
    picture, table, json_path, _ = onnx_demo.render(path, b, regions=regions)
    assert picture.shape[:2] == (120, 160) and len(table) == 3 * len(regions) and json_path
    with pytest.raises(web_demo.DemoError, match="not part of the exported folder"):
        onnx_demo.auto_regions(path)


def test_a_bad_folder_is_a_start_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        web_demo.serve(["--onnx", str(tmp_path), "--no-examples", "--port", "0"], block=False)
    assert e.value.code == 2 and "manifest.json" in capsys.readouterr().err
