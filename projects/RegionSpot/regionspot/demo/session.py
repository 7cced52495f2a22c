"""The web demo's work on one `RegionSpotPredictor` (or an exported folder on onnxruntime), shared
by every visitor of the page: the image's features computed once, regions recognized against any
vocabulary, and the picture, table rows and COCO-format JSON the page shows. tools/web_demo.py is
the page around it."""
import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.structures import Instances
from PIL import Image

from ..config import get_regionspot_cfg
from ..data.images import read_image
from ..data.prompt_files import image_id_of
from ..deploy import OnnxPredictorAdapter
from ..modeling.encoders.region_encoder import SAM_AUTO_EMPTY_HINT
from ..predictor import RegionSpotPredictor
from ..utils.file_io import atomic_write_bytes
from ..visualization import draw_regions
from .access import PageAccess
from .errors import DemoError
from .prompt_lines import Region, check_regions, prompt_arrays, prompt_groups, prompt_points
from .results import (Outcome, empty_instances, encode_timing, region_instances, result_records, results_metadata,
                      table_rows)
from .vocabulary_text import vocabulary_from_text

logger = logging.getLogger("regionspot.web_demo")
# The model the page serves when none is named: a model-zoo name, so it works from any directory.
DEFAULT_CONFIG = "quickstart/RegionSpot-tiny_synthetic.yaml"


def default_weights(cfg, roots: Sequence[str] = ()) -> str:
    """MODEL.WEIGHTS, else the head that training writes for this config (OUTPUT_DIR/model_final.pth,
    e.g. the quickstart's output/quickstart/model_final.pth) if it exists under the working directory
    or one of `roots` (e.g. the repository), else "" (random head)."""
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    for base in (os.getcwd(), *roots):
        path = os.path.join(base, cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(path):
            return os.path.relpath(path) if base == os.getcwd() else path
    return ""


class WebDemo:
    """The page's work, on one `RegionSpotPredictor` shared by all visitors (one at a time)."""

    def __init__(self, config_file: str = DEFAULT_CONFIG, weights: Optional[str] = None,
                 opts: Sequence[str] = (), top_k: int = 3, allow_paths: Sequence[str] = (),
                 allow_model_change: bool = False, onnx: str = "", weights_roots: Sequence[str] = ()):
        """
        Args:
            config_file, weights, opts: the model (`weights` None: `default_weights`).
            top_k: classes shown per region.
            allow_paths, allow_model_change: what visitors may make the server open (`PageAccess`).
            onnx: an exported folder (tools/export_onnx.py) to serve on onnxruntime instead of the
                config's model (`regionspot.deploy.OnnxPredictorAdapter`).
            weights_roots: folders besides the working directory where `default_weights` looks.
        """
        self.lock = threading.RLock()
        self.weights_roots = tuple(weights_roots)
        self.top_k = top_k
        self.onnx = onnx
        self.output_dir = tempfile.mkdtemp(prefix="regionspot_web_")
        atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)
        self.predictor: Optional[RegionSpotPredictor] = None
        self.load_model(config_file, weights, opts)
        # What visitors may make the server open (checked in the server for every request).
        self.access = PageAccess(allow_paths, allow_model_change, self.config_file, self.cfg.MODEL.WEIGHTS)

    # ------------------------------------------------------------------ model
    def load_model(self, config_file: str, weights: Optional[str] = None, opts: Sequence[str] = ()) -> str:
        """Build the predictor (the previous one stays on failure); returns a line describing it."""
        try:
            if self.onnx:
                predictor = OnnxPredictorAdapter(self.onnx, top_k=self.top_k)
                cfg = get_regionspot_cfg()  # the exported model's config, as the manifest records it
                cfg.merge_from_other_cfg(cfg.load_cfg(predictor.onnx.manifest["config"]))
                config_file = f"{self.onnx} (exported)"
            else:
                cfg = get_regionspot_cfg(config_file or DEFAULT_CONFIG, list(opts))
                cfg.MODEL.WEIGHTS = default_weights(cfg, self.weights_roots) if weights is None else weights
                predictor = RegionSpotPredictor(cfg, top_k=self.top_k)
            cfg.freeze()
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
            raise DemoError(f"Cannot load the model of {self.onnx or config_file or DEFAULT_CONFIG}: {e}") from e
        with self.lock:
            self.predictor, self.cfg = predictor, cfg
            self.config_file = config_file or DEFAULT_CONFIG
            self._image_key: Optional[str] = None
            self._auto_boxes: Optional[Tuple[str, np.ndarray]] = None
            self._image_cache: Optional[Tuple[str, float, np.ndarray]] = None
        self.default_vocabulary = predictor.default_vocabulary or "lvis"
        try:  # warm the cache, so the first request does not pay for the default vocabulary
            predictor.vocabulary_embeddings(vocabulary_from_text(self.default_vocabulary)[0])
        except (DemoError, KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
            logger.warning(f"Default vocabulary {self.default_vocabulary!r}: {e}")
        return self.model_line()

    def model_line(self) -> str:
        weights = self.cfg.MODEL.WEIGHTS
        head = f"head `{weights}`" if weights else (
            "**random head: its labels mean nothing** (train one with `./tools/quickstart.sh`, then reload, "
            "or give a checkpoint)")
        where = "onnxruntime" if self.onnx else f"`{self.predictor.device}`"
        return f"Model: `{self.config_file}`, {head}, on {where}."

    # ------------------------------------------------------------------ image
    def read(self, path: Optional[str]) -> np.ndarray:
        """The RGB image of an uploaded file (the last one is kept decoded)."""
        if not path:
            raise DemoError("No image: upload one (or pick an example) first.")
        with self.lock:
            try:
                stamp = os.path.getmtime(path)
                if self._image_cache and self._image_cache[:2] == (path, stamp):
                    return self._image_cache[2]
                rgb = read_image(path, format="RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DemoError(f"Cannot read the image {os.path.basename(path)}: {e}") from e
            self._image_cache = (path, stamp, rgb)
            return rgb

    def set_image(self, path: Optional[str]) -> Tuple[np.ndarray, str, Optional[float]]:
        """(the RGB image, its key, seconds `set_image` took or None when the features were reused)."""
        rgb = self.read(path)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self.lock:
            if key == self._image_key:
                return rgb, key, None
            start = time.perf_counter()
            try:
                self.predictor.set_image(rgb, format="RGB")
            except (ValueError, RuntimeError) as e:
                raise DemoError(f"Cannot encode the image {os.path.basename(path)}: {e}") from e
            self._image_key = key
            return rgb, key, time.perf_counter() - start

    def auto_regions(self, path: Optional[str]) -> Tuple[List[Region], List[Tuple[str, float]]]:
        """Regions of SAM's automatic masks (their boxes), cached per image."""
        with self.lock:
            rgb, key, encoded = self.set_image(path)
            timings = [encode_timing(encoded)]
            if self._auto_boxes is None or self._auto_boxes[0] != key:
                start = time.perf_counter()
                try:
                    boxes = self.predictor.sam_auto_boxes().cpu().numpy()
                except RuntimeError as e:  # an exported folder has no automatic mask generator
                    raise DemoError(str(e)) from e
                self._auto_boxes = (key, boxes)
                timings.append(("SAM automatic masks", time.perf_counter() - start))
            else:
                timings.append(("SAM automatic masks (reused)", 0.0))
            boxes = self._auto_boxes[1]
        if not len(boxes):
            raise DemoError(SAM_AUTO_EMPTY_HINT)
        return [Region(box=[float(v) for v in b]) for b in boxes], timings

    # ------------------------------------------------------------------ regions
    def recognize(self, path: Optional[str], regions: Sequence[Region], vocabulary: str,
                  synonyms: bool = False, top_k: Optional[int] = None) -> Outcome:
        """Classify `regions` of the image at `path` against `vocabulary`: the predictor's
        `set_image` (skipped for the image already set), then one `predict` per group of regions."""
        top_k = int(top_k or self.top_k)
        with self.lock:
            rgb, _, encoded = self.set_image(path)
            timings = [encode_timing(encoded)]
            vocab, id_spec = vocabulary_from_text(vocabulary, synonyms, self.cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY,
                                                  may_open=self.access.may_open)
            start = time.perf_counter()
            try:
                names, _ = self.predictor.vocabulary_embeddings(vocab)
            except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
                raise DemoError(f"Vocabulary: {str(e).strip(chr(34))}") from e
            timings.append((f"vocabulary ({len(names)} classes)", time.perf_counter() - start))
            check_regions(regions, rgb.shape[:2])
            start = time.perf_counter()
            parts = []
            for group in prompt_groups(regions):
                try:
                    res = self.predictor.predict(**prompt_arrays([regions[i] for i in group]), vocabulary=vocab,
                                                 top_k=min(top_k, len(names)), return_masks=True).cpu()
                except ValueError as e:
                    raise DemoError(str(e)) from e
                parts.append(region_instances(res, [i + 1 for i in group]))
            if parts:
                timings.append((f"regions ({len(regions)}: SAM decoder + head)", time.perf_counter() - start))
        instances = Instances.cat(parts) if parts else empty_instances(rgb.shape[:2])
        instances = instances[instances.region_ids.argsort()]
        return Outcome(instances, list(names), id_spec, timings)

    # ------------------------------------------------------------------ outputs
    def render(self, path: Optional[str], outcome: Optional[Outcome], threshold: float = 0.0,
               regions: Sequence[Region] = (), pending: Optional[Sequence[float]] = None
               ) -> Tuple[np.ndarray, List[list], Optional[str], List[Tuple[str, float]]]:
        """(picture, table rows (`TABLE_COLUMNS`), COCO-format JSON file or None, [("drawing", seconds)])
        of an outcome (None:
        the image and its points only), as the page shows them; regions scoring below `threshold`
        are left out of all three, as tools/demo.py's --confidence-threshold does."""
        rgb = self.read(path)
        start = time.perf_counter()
        pts, labels = prompt_points(regions, pending)
        if outcome is None:
            picture = draw_regions(rgb, empty_instances(rgb.shape[:2]), results_metadata([]), points=pts,
                                   point_labels=labels).get_image()
            return picture, [], None, []
        inst = outcome.instances[outcome.instances.scores >= threshold]
        picture = draw_regions(rgb, inst, results_metadata(outcome.names), region_ids=inst.region_ids.tolist(),
                               points=pts, point_labels=labels).get_image()
        drawing = time.perf_counter() - start
        rows = table_rows(inst, outcome.names, {k: r.text() for k, r in enumerate(regions, start=1)})
        json_path = None
        if len(inst):
            records = result_records(inst, image_id_of(path, {}), outcome.names, outcome.id_spec)
            stem = os.path.splitext(os.path.basename(path))[0]
            folder = tempfile.mkdtemp(dir=self.output_dir)
            json_path = os.path.join(folder, f"{stem}_regionspot.json")
            atomic_write_bytes(json.dumps(records).encode(), json_path)
        return picture, rows, json_path, [("drawing", drawing)]
