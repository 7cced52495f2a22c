"""The RegionSpot meta-architecture: a prompt source wired to the region pipeline."""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances

from .prompt_sources import PromptSource, build_prompt_source
from .region_pipeline import RegionPipeline, sanitize_boxes


def _where(x: Dict) -> str:
    return f" of image {x.get('file_name', x.get('image_id', '?'))}"


@META_ARCH_REGISTRY.register()
class RegionSpot(RegionPipeline):
    """Recognize any region: box prompts in, `Instances` with classes, scores and masks out.

    Inputs follow detectron2: a list of dicts with "image" (3, H, W, in `input_format`), optional
    "height" and "width" (output size), what the prompt source reads (e.g. "instances" with
    `gt_boxes`, or "proposals"), "vocabulary" (the vocabulary of that image) and, for training on
    cached tokens, "sam_tokens" (N, C) of the gt boxes.
    """

    @configurable
    def __init__(self, *, prompt_source: PromptSource, max_dets_per_image: int = 300,
                 input_format: str = "RGB", **pipeline_kwargs):
        """
        Args:
            prompt_source: where box prompts come from at inference (`prompt_sources`).
            max_dets_per_image: (box, class) pairs kept per image.
            input_format: channel order of input["image"] ("RGB" or "BGR"); SAM and CLIP get RGB.
            pipeline_kwargs: the encoders, the head and the rest, as for `RegionPipeline`.
        """
        super().__init__(**pipeline_kwargs)
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for RegionSpot, not {input_format!r}.")
        self.prompt_source = prompt_source
        self.max_dets_per_image = max_dets_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        return {
            **RegionPipeline.from_config(cfg),
            "prompt_source": build_prompt_source(cfg),
            "max_dets_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
        }

    def _rgb_images(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """The inputs' (3, H, W) images on the device, in RGB whatever INPUT.FORMAT the loader used."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        return [img.flip(0) for img in images] if self.input_format == "BGR" else images

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        return self.losses(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Returns, per input, {"instances": Instances} at the input's "height" x "width"."""
        images = self._rgb_images(batched_inputs)
        sizes = [tuple(img.shape[-2:]) for img in images]
        features = self.encode_images(images)
        boxes, scores = [], []
        for x, size, (b, s) in zip(batched_inputs, sizes, self.prompt_source(batched_inputs, images, features, self)):
            b = b.float().clone()
            keep = sanitize_boxes(b, size, _where(x))
            boxes.append(b[keep])
            scores.append(None if s is None else s[keep])
        sam_emb, input_sizes, clip_tokens = features
        regions = self.recognize(sam_emb, input_sizes, clip_tokens, sizes, boxes,
                                 [x.get("vocabulary") for x in batched_inputs], scores)
        return [
            {"instances": self.detections(r["probs"], boxes[i], r["low_res"], sizes[i], input_sizes[i],
                                          (x.get("height", sizes[i][0]), x.get("width", sizes[i][1])),
                                          self.max_dets_per_image)}
            for i, (x, r) in enumerate(zip(batched_inputs, regions))
        ]

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The original code's loss (`region_losses`) of the gt regions against their classes."""
        images = self._rgb_images(batched_inputs)
        online = any("sam_tokens" not in x for x in batched_inputs)
        sam_emb, _, clip_tokens = self.encode_images(images, sam=online)
        tokens = []
        for i, x in enumerate(batched_inputs):
            if "sam_tokens" in x:  # cached mode: tokens were extracted offline for these boxes
                width = x["sam_tokens"].shape[-1]
                if width != self.sam_encoder.token_dim:
                    raise ValueError(
                        f"SAM token cache file {x.get('sam_tokens_file', '(image ' + str(x.get('image_id')) + ')')} "
                        f"holds {width}-d tokens, but the model's SAM ({self.sam_encoder.__class__.__name__}, "
                        f"MODEL.REGIONSPOT.SAM.TYPE) makes {self.sam_encoder.token_dim}-d tokens: the cache was made "
                        "by another SAM. Re-extract it with tools/extract_sam_tokens.py, or set "
                        "MODEL.REGIONSPOT.TOKEN_CACHE_DIR to the cache of this SAM.")
                tokens.append(x["sam_tokens"].to(self.device).float())
            else:
                boxes = x["instances"].gt_boxes.tensor.to(self.device)
                tokens.append(self.decode_regions(sam_emb[i], tuple(images[i].shape[-2:]), boxes=boxes, masks=False)[0])
        classes = [x["instances"].gt_classes for x in batched_inputs]
        vocabularies = [x.get("vocabulary") for x in batched_inputs]
        return {"loss_focal": self.region_losses(tokens, clip_tokens, classes, vocabularies)}
