"""Export a RegionSpot model to a folder of ONNX graphs that `regionspot_deploy` serves without torch.

The folder holds four graphs and what serving needs around them:

- ``sam_image.onnx``: SAM's image encoder, (1, 3, S, S) preprocessed image -> image features;
- ``clip_image.onnx``: CLIP's image tower up to the token map, (1, 3, s, s) -> (1, L, W);
- the region graph, as two graphs: ``region_decoder.onnx`` (SAM's prompt encoder and mask
  decoder: image features + prompts -> region tokens and low-res mask logits) and
  ``region_head.onnx`` (the fusion head and the classifier: region tokens + CLIP tokens + class
  text embeddings -> region embeddings and class probabilities). Prompts come in SAM's point form
  (N, P, 2) with labels (N, P): a box is its two corners labelled 2 and 3, points are labelled
  1 / 0, padding -1. The class text embeddings (C, D) are an input, so any vocabulary runs on one
  export; N, P and C are dynamic axes. Two graphs, because prompts decode independently (serving
  decodes them in chunks, as the PyTorch path does, so memory stays bounded at 300 prompts) while
  the head needs all of an image's regions at once;
- ``text.onnx``: CLIP's text tower, (N, 77) token ids -> (N, D), with the BPE vocabulary file;
- ``manifest.json``: every number the numpy pre- and post-processing needs, the config, opset,
  package versions and the SHA256 of every file (`regionspot_deploy.manifest`);
- optionally a vocabulary's text embeddings as ``vocabulary.npy`` with ``vocabulary.json``.

Each graph wraps the packages' own modules (`segment_anything`'s `SamOnnxModel` point embedding and
`MaskDecoder.predict_masks`, the clip package's towers, our head), so nothing is re-implemented.
"""
import json
import logging
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from regionspot_deploy import manifest as mf

from .modeling.region_pipeline import RegionPipeline
from .modeling.text_embeddings import NAME_SUFFIXES

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ExportError(RuntimeError):
    """A part of the model that cannot be exported, with the reason."""


# ------------------------------------------------------------------ graph wrappers
class SamImageGraph(nn.Module):
    """(1, 3, S, S) preprocessed image -> SAM's image features (SAM 2: embedding and its two skips)."""

    def __init__(self, sam_encoder: nn.Module, family: str):
        super().__init__()
        self.sam_encoder = sam_encoder
        self.family = family

    def forward(self, image: torch.Tensor):
        out = self.sam_encoder.encode_images(image)
        if self.family == "sam2":
            f = out[0]
            return f.image_embed[None], f.high_res_feats[0][None], f.high_res_feats[1][None]
        return out


class ClipImageGraph(nn.Module):
    """(1, 3, s, s) preprocessed image -> (1, L, W) CLIP token map."""

    def __init__(self, clip_encoder: nn.Module):
        super().__init__()
        self.clip_encoder = clip_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip_encoder.encode_image_tokens(image).float()


class TextGraph(nn.Module):
    """(N, context) token ids -> (N, D) text embeddings, as CLIP projects them (not normalised)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip_model = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip_model.encode_text(tokens).float()


class _Sam1Decoder(nn.Module):
    """SAM's prompt encoding and mask decoding of N prompt sets in SAM's point form, as
    `SamRegionEncoder.decode_prompts` does them with ``multimask_output=False``; the region token
    is the decoder transformer's first mask token (read by a hook, as the encoder reads it)."""

    def __init__(self, sam_encoder: nn.Module):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel

        self.sam = sam_encoder.sam
        self.points = SamOnnxModel(self.sam, return_single_mask=True)  # its traceable point embedding

    def forward(self, feats: Sequence[torch.Tensor], coords: torch.Tensor, labels: torch.Tensor):
        captured: List[torch.Tensor] = []
        hook = self.sam.mask_decoder.transformer.register_forward_hook(
            lambda m, i, o: captured.append(o[0][:, 1, :]))
        try:
            sparse = self.points._embed_points(coords, labels)
            dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            masks, _ = self.sam.mask_decoder.predict_masks(
                image_embeddings=feats[0], image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        finally:
            hook.remove()
        return captured[0], masks[:, 0:1]


class _Sam2Decoder(nn.Module):
    """SAM 2's prompt encoding and mask decoding, as `Sam2RegionEncoder.decode_prompts` (SAM 2's
    prompt encoder always appends its padding point, as with ``boxes=None`` there)."""

    def __init__(self, sam_encoder: nn.Module):
        super().__init__()
        self.sam = sam_encoder.sam

    def forward(self, feats: Sequence[torch.Tensor], coords: torch.Tensor, labels: torch.Tensor):
        sparse, dense = self.sam.sam_prompt_encoder(points=(coords, labels.int()), boxes=None, masks=None)
        low_res, _, sam_tokens, _ = self.sam.sam_mask_decoder(
            image_embeddings=feats[0], image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=True, high_res_features=list(feats[1:]))
        return sam_tokens[:, 0], low_res


class RegionDecoderGraph(nn.Module):
    """Image features + N prompts in SAM's point form -> region tokens (N, C) and low-res mask
    logits (N, 1, S/4, S/4): the pipeline's `decode_regions`. Prompts are independent here, so
    serving runs it on chunks of prompts, with bounded memory (SAM's decoder repeats the image
    embedding per prompt: about 60 MB of activations per prompt at 1024 pixels)."""

    def __init__(self, pipeline: RegionPipeline, family: str):
        super().__init__()
        self.decoder = _Sam2Decoder(pipeline.sam_encoder) if family == "sam2" else _Sam1Decoder(pipeline.sam_encoder)

    def forward(self, *args: torch.Tensor):
        *feats, coords, labels = args
        tokens, low_res = self.decoder(feats, coords, labels)
        return tokens.float(), low_res.float()


class RegionHeadGraph(nn.Module):
    """All N region tokens of one image + its CLIP tokens + C class embeddings -> region embeddings
    (N, D) and class probabilities (N, C): the pipeline's `embed_regions` and `probabilities` (the
    regions attend to each other, so they go in together)."""

    def __init__(self, pipeline: RegionPipeline):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, region_tokens: torch.Tensor, clip_tokens: torch.Tensor, text_embeddings: torch.Tensor):
        emb = self.pipeline.head(region_tokens[None], clip_tokens)[0]
        return emb, self.pipeline.probabilities(emb, text_embeddings)


# ------------------------------------------------------------------ what the manifest records
def sam_family(pipeline: RegionPipeline) -> str:
    name = type(pipeline.sam_encoder).__name__
    if name == "SamRegionEncoder":
        return "sam"
    if name == "Sam2RegionEncoder":
        return "sam2"
    raise ExportError(f"SAM image encoder: the region encoder {name} has no ONNX export.")


def sam_section(pipeline: RegionPipeline, family: str) -> Dict:
    enc = pipeline.sam_encoder
    if family == "sam":
        mean = enc.sam.pixel_mean.flatten().tolist()
        std = enc.sam.pixel_std.flatten().tolist()
        scale, resize = 1.0, "longest_side"
    else:
        norm = [t for t in enc.transforms.transforms if type(t).__name__ == "Normalize"][0]
        mean, std, scale, resize = list(norm.mean), list(norm.std), 1.0 / 255.0, "square"
    return {"family": family, "image_size": int(enc.image_size), "resize": resize, "resize_mode": "bilinear",
            "antialias": True, "value_scale": scale, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "mask_threshold": float(enc.mask_threshold),
            "low_res_size": int(enc.image_size) // 4, "token_dim": int(enc.token_dim)}


def clip_section(pipeline: RegionPipeline, cfg) -> Dict:
    enc = pipeline.clip_encoder
    return {"backend": cfg.MODEL.REGIONSPOT.CLIP.BACKEND, "name": cfg.MODEL.REGIONSPOT.CLIP.NAME,
            "input_size": int(enc.input_size), "resize_mode": enc.resize_mode, "antialias": bool(enc.antialias),
            "mean": enc.pixel_mean.flatten().tolist(), "std": enc.pixel_std.flatten().tolist(),
            "width": int(enc.width), "text_dim": int(enc.text_dim),
            "logit_scale": float(enc.logit_scale.float())}


def package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "segment-anything", "openai-clip",
                 "sam2", "open-clip-torch", "regionspot"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------ export
def _export(module: nn.Module, args: Tuple, path: str, input_names: List[str], output_names: List[str],
            dynamic_axes: Dict, opset: int, part: str) -> None:
    """torch.onnx.export with the TorchScript exporter (the dynamo one fails on SAM's decoder
    repeat and is much slower); a failure becomes an ExportError naming the part."""
    module.eval()  # a wrapper is created in training mode, and the exporter restores that mode on exit
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's warnings concern Python-level shape checks of the packages' modules, which
            # hold for every input of the exported shapes; the equality tests check the graphs.
            warnings.simplefilter("ignore")
            # nn.MultiheadAttention's fused inference path (open_clip's towers take it) has no ONNX
            # form; its plain path computes the same.
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
    except Exception as e:
        raise ExportError(f"{part}: torch.onnx.export failed ({type(e).__name__}: {str(e)[:500]})") from e


def _tokenizer_file(pipeline: RegionPipeline, cfg) -> Tuple[str, int]:
    """The BPE vocabulary file of CLIP's tokenizer and the context length, or ExportError."""
    if cfg.MODEL.REGIONSPOT.CLIP.BACKEND != "clip":
        raise ExportError(
            "text graph: open_clip models tokenize with open_clip's own tokenizers (Hugging Face ones "
            "for SigLIP and others), which regionspot_deploy does not implement; export the vocabulary "
            "as embeddings instead (--vocabulary), or embed new names where torch is installed.")
    import clip.simple_tokenizer as st

    path = os.path.join(os.path.dirname(st.__file__), "bpe_simple_vocab_16e6.txt.gz")
    return path, int(pipeline.clip_encoder.clip_model.context_length)


def export_folder(pipeline: RegionPipeline, cfg, output: str, opset: int = DEFAULT_OPSET,
                  text: bool = True, vocabulary: Optional[Tuple[List[str], np.ndarray]] = None,
                  quantize_int8: bool = False, fp16: bool = False, vocabulary_spec: str = "") -> Dict:
    """Write the folder (atomically: into a temporary sibling, then renamed). Returns the manifest.

    Args:
        pipeline: the model's RegionPipeline (eval mode, CPU).
        cfg: its config (recorded, and read for the test-time resize and mask settings).
        output: the folder to write; must not exist or be empty.
        opset: ONNX opset.
        text: export the text graph and tokenizer. Not possible for open_clip (see
            `_tokenizer_file`): then it is left out with a warning, and the manifest's
            "not_exported" says why.
        vocabulary: (names, (C, D) embeddings) to store beside the graphs.
        vocabulary_spec: what that vocabulary was asked as (e.g. "lvis"), recorded in the manifest.
        quantize_int8: also write int8 dynamically quantized image encoders (``*.int8.onnx``).
        fp16: store the graphs' weights in float16 (inputs and outputs stay float32).

    The graphs are traced on the CPU: `pipeline` is moved there (and left in eval mode); move it
    back yourself if you go on using it on another device.
    """
    if os.path.isdir(output) and os.listdir(output):
        raise FileExistsError(f"--output {output} exists and is not empty: choose a new folder.")
    pipeline = pipeline.eval().cpu()
    family = sam_family(pipeline)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        manifest = _write(pipeline, cfg, tmp, family, opset, text, vocabulary, quantize_int8, fp16, vocabulary_spec)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(pipeline, cfg, folder, family, opset, text, vocabulary, quantize_int8, fp16, vocabulary_spec) -> Dict:
    c = cfg.MODEL.REGIONSPOT
    sam = sam_section(pipeline, family)
    clip_info = clip_section(pipeline, cfg)
    S, s = sam["image_size"], clip_info["input_size"]
    graphs: Dict[str, str] = {}

    # Image encoders, traced on one image; batch is fixed at 1 (serving encodes one image per call).
    sam_out = ["image_embeddings"] + (["high_res_feats_0", "high_res_feats_1"] if family == "sam2" else [])
    logger.info("exporting SAM's image encoder")
    _export(SamImageGraph(pipeline.sam_encoder, family), (torch.zeros(1, 3, S, S),), os.path.join(folder, "sam_image.onnx"),
            ["image"], sam_out, {}, opset, "SAM image encoder")
    graphs["sam_image"] = "sam_image.onnx"
    logger.info("exporting CLIP's image tower")
    _export(ClipImageGraph(pipeline.clip_encoder), (torch.zeros(1, 3, s, s),), os.path.join(folder, "clip_image.onnx"),
            ["image"], ["clip_tokens"], {}, opset, "CLIP image tower")
    graphs["clip_image"] = "clip_image.onnx"

    # The region graphs, traced with features of the right shapes, 3 prompts of 3 points and 5 classes.
    with torch.no_grad():
        feats = SamImageGraph(pipeline.sam_encoder, family)(torch.zeros(1, 3, S, S))
        feats = feats if isinstance(feats, tuple) else (feats,)
        clip_tokens = pipeline.clip_encoder.encode_image_tokens(torch.zeros(1, 3, s, s)).float()
    coords = torch.rand(3, 3, 2) * S
    labels = torch.tensor([[2.0, 3.0, 1.0]] * 3)
    prompts = {"point_coords": {0: "regions", 1: "points"}, "point_labels": {0: "regions", 1: "points"},
               "region_tokens": {0: "regions"}, "low_res_masks": {0: "regions"}}
    logger.info("exporting the region decoder (SAM's prompt encoder and mask decoder)")
    _export(RegionDecoderGraph(pipeline, family), (*feats, coords, labels), os.path.join(folder, "region_decoder.onnx"),
            sam_out + ["point_coords", "point_labels"], ["region_tokens", "low_res_masks"], prompts, opset,
            "region decoder")
    graphs["region_decoder"] = "region_decoder.onnx"
    tokens = torch.randn(3, pipeline.sam_encoder.token_dim)
    text_emb = torch.nn.functional.normalize(torch.randn(5, clip_info["text_dim"]), dim=-1)
    axes = {"region_tokens": {0: "regions"}, "text_embeddings": {0: "classes"}, "region_embeddings": {0: "regions"},
            "probabilities": {0: "regions", 1: "classes"}}
    logger.info("exporting the region head (fusion head and classifier)")
    _export(RegionHeadGraph(pipeline), (tokens, clip_tokens, text_emb), os.path.join(folder, "region_head.onnx"),
            ["region_tokens", "clip_tokens", "text_embeddings"], ["region_embeddings", "probabilities"], axes, opset,
            "region head")
    graphs["region_head"] = "region_head.onnx"

    text_info, skipped = None, {}
    if text:
        try:
            bpe, context = _tokenizer_file(pipeline, cfg)
        except ExportError as e:  # the rest serves without it: the vocabulary comes as embeddings
            logger.warning(f"Not exported: {e}")
            skipped["text"] = str(e)
            text = False
    if text:
        logger.info("exporting CLIP's text tower")
        _export(TextGraph(pipeline.clip_encoder.clip_model), (torch.zeros(2, context, dtype=torch.long),),
                os.path.join(folder, "text.onnx"), ["tokens"], ["text_embeddings"],
                {"tokens": {0: "prompts"}, "text_embeddings": {0: "prompts"}}, opset, "text graph")
        graphs["text"] = "text.onnx"
        shutil.copyfile(bpe, os.path.join(folder, "bpe_vocab.txt.gz"))
        text_info = {"tokenizer": "clip_bpe", "bpe_vocab": "bpe_vocab.txt.gz", "context_length": context,
                     "templates": list(pipeline.vocabulary.templates), "strip_suffixes": list(NAME_SUFFIXES)}

    if fp16:
        for key in list(graphs):
            _to_fp16(os.path.join(folder, graphs[key]))
    int8 = {}
    if quantize_int8:
        for key in ("sam_image", "clip_image"):
            int8[key] = _quantize(folder, graphs[key])

    vocab_info = None
    if vocabulary is not None:
        names, emb = vocabulary
        np.save(os.path.join(folder, "vocabulary.npy"), np.asarray(emb, dtype=np.float32))
        with open(os.path.join(folder, "vocabulary.json"), "w") as f:
            json.dump(list(names), f)
        vocab_info = {"embeddings": "vocabulary.npy", "names": "vocabulary.json", "spec": vocabulary_spec}

    manifest = {
        "format": mf.FORMAT,
        "graphs": graphs,
        "not_exported": skipped,
        "int8_graphs": int8,
        "opset": opset,
        "precision": "fp16" if fp16 else "fp32",
        "sam": sam,
        "clip": clip_info,
        "text": text_info,
        "vocabulary": vocab_info,
        "test_resize": {"min_size": int(_first(cfg.INPUT.MIN_SIZE_TEST)), "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
                        "interp": "pil_bilinear"},
        "mask_on": bool(c.MASK_ON),
        "fast_mask_paste": bool(c.FAST_MASK_PASTE),
        "config": cfg.dump(),
        "versions": package_versions(),
    }
    mf.write_manifest(folder, manifest)
    return manifest


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def _quantize(folder: str, name: str) -> str:
    """int8 dynamic quantization of a graph's MatMul/Gemm weights (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = name.replace(".onnx", ".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape pre-processing first, logged on the root logger
    try:
        # A graph over protobuf's 2 GB (SAM ViT-H) keeps its weights in external files: so must the output.
        quantize_dynamic(os.path.join(folder, name), os.path.join(folder, out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=bool(_external_files(os.path.join(folder, name))))
    finally:
        root.setLevel(level)
    return out


def _to_fp16(path: str) -> None:
    """Store float32 weights (initializers) as float16, with a Cast back to float32 after each, so the
    graph's inputs, outputs and arithmetic stay float32: the file halves, the results move by fp16
    rounding of the weights only."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    external = _external_files(path)
    model = onnx.load(path)
    g = model.graph
    casts = []
    for init in list(g.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 16:
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        half = numpy_helper.from_array(arr, init.name + "__fp16")
        g.initializer.remove(init)
        g.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__cast"))
    for node in reversed(casts):
        g.node.insert(0, node)
    for init in g.initializer:  # now in memory: saved inline, or anew as one external file when too large
        init.data_location = onnx.TensorProto.DEFAULT
        del init.external_data[:]
    too_large = model.ByteSize() > 2_000_000_000 if not external else sum(
        numpy_helper.to_array(i).nbytes for i in g.initializer) > 2_000_000_000
    onnx.save(model, path, save_as_external_data=too_large, location=os.path.basename(path) + ".data")
    folder = os.path.dirname(path)
    for rel in external - ({os.path.basename(path) + ".data"} if too_large else set()):
        os.remove(os.path.join(folder, rel))


def _external_files(path: str) -> set:
    """The files holding a graph's external weights (the exporter writes them beside graphs over 2 GB)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data if entry.key == "location"}
