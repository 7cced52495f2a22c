"""The RegionSpot meta-architecture: frozen SAM + frozen CLIP + a trainable fusion head."""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from .clip_encoder import ClipImageTextEncoder, build_clip_encoder
from .config import check_regionspot_config
from .head import RegionSpotHead
from .sam_encoder import SamRegionEncoder, build_sam_encoder
from .structures import IndexedMasks
from .text_embeddings import (
    cached_class_embeddings,
    check_vocabulary,
    clip_fingerprint,
    get_templates,
    load_embedding_file,
    vocabulary_names,
)

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PROMPT_SOURCES = ("gt", "proposals", "sam_auto")


def sanitize_boxes(boxes: torch.Tensor, image_size: Tuple[int, int], where: str = "") -> torch.Tensor:
    """Check box prompts and return the indices of the usable ones, clipping boxes in place.

    Boxes must be (N, 4) XYXY with finite coordinates (else ValueError naming `where`). Boxes are
    clipped to the image; those left with zero area are dropped with a warning that counts them.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"Boxes{where} must have shape (N, 4) in XYXY, got {tuple(boxes.shape)}.")
    if not torch.isfinite(boxes).all():
        bad = (~torch.isfinite(boxes)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"Boxes{where} have NaN or infinite coordinates at rows {bad}.")
    h, w = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().flatten()
    dropped = boxes.shape[0] - keep.numel()
    if dropped:
        logger.warning(f"Dropped {dropped} of {boxes.shape[0]} boxes{where} with zero area inside the image.")
    return keep


def compile_frozen(sam_encoder: SamRegionEncoder, clip_encoder: ClipImageTextEncoder, mode: str,
                   autocast: bool = False) -> None:
    """torch.compile the networks that dominate inference time, in place: SAM's image encoder and
    mask decoder, and CLIP's image transformer. `Module.compile` keeps parameter names, so
    checkpoints load as before, and the region-token hook on the decoder keeps working.

    Under autocast the mask decoder is compiled as its two heavy parts (two-way transformer,
    output upscaling) rather than whole: inductor's whole-decoder graph returned NaN tokens and
    masks in bf16 on a CPU (SAM ViT-B; each part alone is exact and keeps most of the gain)."""
    decoder = sam_encoder.sam.mask_decoder
    decoder_parts = (decoder.transformer, decoder.output_upscaling) if autocast else (decoder,)
    for module in (sam_encoder.sam.image_encoder, *decoder_parts, clip_encoder.clip_model.visual.transformer):
        module.compile(mode=None if mode == "default" else mode)


@META_ARCH_REGISTRY.register()
class RegionSpot(nn.Module):
    """Recognize any region: box prompts in, `Instances` with classes, scores and masks out.

    Inputs follow detectron2: a list of dicts with "image" (3, H, W, RGB), optional "height" and
    "width" (output size), and the prompts: "instances" with `gt_boxes` (PROMPT="gt"), "proposals"
    with `proposal_boxes` and `scores` or `objectness_logits` (PROMPT="proposals"), or nothing
    (PROMPT="sam_auto"). "vocabulary" names the vocabulary of that image; "sam_tokens" (N, C) may
    hold cached SAM tokens of the gt boxes for training.
    """

    @configurable
    def __init__(
        self,
        *,
        sam_encoder: SamRegionEncoder,
        clip_encoder: ClipImageTextEncoder,
        head: RegionSpotHead,
        vocabulary: str = "",
        custom_vocabulary: Sequence[str] = (),
        templates: Sequence[str] = ("a photo of a {}.",),
        text_cache_dir: str = "",
        text_chunk_size: int = 256,
        autocast: str = "",
        compile_mode: str = "",
        prompt: str = "gt",
        use_proposal_score: bool = True,
        max_dets_per_image: int = 300,
        mask_on: bool = True,
        fast_mask_paste: bool = True,
        sam_auto_params: Optional[Dict] = None,
        input_format: str = "RGB",
    ):
        """
        Args:
            sam_encoder: frozen SAM wrapper giving region tokens and masks.
            clip_encoder: frozen CLIP wrapper giving the image token map and text embeddings.
            head: the trainable fusion head.
            vocabulary: default vocabulary spec for inputs that name none (see `vocabulary_names`).
            custom_vocabulary: class names for vocabulary "custom".
            templates: prompt templates averaged into each class embedding.
            text_cache_dir: folder of the text-embedding cache ("" = default).
            text_chunk_size: prompts per text-encoder call.
            autocast: "", "bf16" or "fp16": mixed precision of the frozen encoders.
            compile_mode: "" or a torch.compile mode for the frozen networks (`compile_frozen`).
            prompt: "gt", "proposals" or "sam_auto": where box prompts come from at inference.
            use_proposal_score: multiply class probabilities by the proposal score when there is one.
            max_dets_per_image: (box, class) pairs kept per image.
            mask_on: predict masks.
            fast_mask_paste: paste masks with one interpolation (see SamRegionEncoder.paste_masks).
            sam_auto_params: keyword arguments of SamAutomaticMaskGenerator.
            input_format: channel order of input["image"] ("RGB" or "BGR"); SAM and CLIP get RGB.
        """
        super().__init__()
        if prompt not in PROMPT_SOURCES:
            raise ValueError(f"Unknown prompt source {prompt!r} (MODEL.REGIONSPOT.PROMPT); choose one of {PROMPT_SOURCES}.")
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"Unknown autocast {autocast!r} (MODEL.REGIONSPOT.AUTOCAST); choose '', 'bf16' or 'fp16'.")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"Unknown compile mode {compile_mode!r} (MODEL.REGIONSPOT.COMPILE); choose one of "
                             f"{COMPILE_MODES}.")
        self.sam_encoder = sam_encoder
        self.clip_encoder = clip_encoder
        self.head = head
        for p in list(sam_encoder.parameters()) + list(clip_encoder.parameters()):
            p.requires_grad_(False)
        self.vocabulary = vocabulary
        self.custom_vocabulary = list(custom_vocabulary)
        self.templates = tuple(templates)
        self.text_cache_dir = text_cache_dir
        self.text_chunk_size = text_chunk_size
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        if compile_mode:
            compile_frozen(sam_encoder, clip_encoder, compile_mode, autocast=self.autocast_dtype is not None)
        self.prompt = prompt
        self.use_proposal_score = use_proposal_score
        self.max_dets_per_image = max_dets_per_image
        self.mask_on = mask_on
        self.fast_mask_paste = fast_mask_paste
        self.sam_auto_params = dict(sam_auto_params or {})
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for RegionSpot, not {input_format!r}.")
        self.input_format = input_format
        self._text_embeddings: Dict[str, Tuple[List[str], torch.Tensor]] = {}
        self._fingerprint: Optional[str] = None
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        # New CLIP weights (e.g. from a checkpoint) invalidate the text embeddings made so far.
        clip_encoder.register_load_state_dict_post_hook(self._forget_text_embeddings)

    @classmethod
    def from_config(cls, cfg):
        check_regionspot_config(cfg)  # before any (slow) build: a bad value fails at once
        c = cfg.MODEL.REGIONSPOT
        sam_encoder = build_sam_encoder(cfg)
        clip_encoder = build_clip_encoder(cfg)
        head = RegionSpotHead(
            cfg, token_dim=sam_encoder.token_dim, clip_width=clip_encoder.width,
            text_dim=clip_encoder.text_dim,
        )
        return {
            "sam_encoder": sam_encoder,
            "clip_encoder": clip_encoder,
            "head": head,
            "vocabulary": c.VOCABULARY,
            "custom_vocabulary": c.CUSTOM_VOCABULARY,
            "templates": get_templates(c.TEXT.TEMPLATES),
            "text_cache_dir": c.TEXT.CACHE_DIR,
            "text_chunk_size": c.TEXT.CHUNK_SIZE,
            "autocast": c.AUTOCAST,
            "compile_mode": c.COMPILE,
            "prompt": c.PROMPT,
            "use_proposal_score": c.USE_PROPOSAL_SCORE,
            "max_dets_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "mask_on": c.MASK_ON,
            "fast_mask_paste": c.FAST_MASK_PASTE,
            "sam_auto_params": {
                "points_per_side": c.SAM_AUTO.POINTS_PER_SIDE,
                "pred_iou_thresh": c.SAM_AUTO.PRED_IOU_THRESH,
                "stability_score_thresh": c.SAM_AUTO.STABILITY_SCORE_THRESH,
                "min_mask_region_area": c.SAM_AUTO.MIN_MASK_REGION_AREA,
            },
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def train(self, mode: bool = True):
        """Only the head changes mode: the frozen encoders always stay in eval mode."""
        super().train(mode)
        self.sam_encoder.eval()
        self.clip_encoder.eval()
        return self

    # ------------------------------------------------------------------ vocabulary
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = clip_fingerprint(self.clip_encoder.clip_model)
        return self._fingerprint

    def _forget_text_embeddings(self, *_) -> None:
        self._text_embeddings.clear()
        self._fingerprint = None

    def _encode_text(self, prompts: List[str]) -> torch.Tensor:
        with self._autocast():
            return self.clip_encoder.encode_text(prompts)

    def text_embeddings(self, spec: Optional[str] = None) -> Tuple[List[str], torch.Tensor]:
        """(class names, (C, D) embeddings on the model's device) for a vocabulary spec.

        A spec is "lvis", "coco", "custom", a registered dataset name, or the path of an
        embedding file. Results are kept in memory and, for names, in the on-disk cache.
        """
        spec = spec if spec is not None else self.vocabulary
        if not spec:
            raise ValueError(
                "No vocabulary: set MODEL.REGIONSPOT.VOCABULARY, or give inputs a 'vocabulary' "
                "(the test and train mappers set it to their dataset's name)."
            )
        if spec not in self._text_embeddings:
            if spec.endswith((".pth", ".pt")) or os.path.isfile(spec):
                payload = load_embedding_file(spec, self.fingerprint)
                names = check_vocabulary(payload["names"], spec)
                emb = payload["embeddings"]
            else:
                names = vocabulary_names(spec, self.custom_vocabulary)
                emb = cached_class_embeddings(
                    self._encode_text, self.fingerprint, names, self.templates,
                    self.text_cache_dir, self.text_chunk_size,
                )
            self._text_embeddings[spec] = (names, emb)
        names, emb = self._text_embeddings[spec]
        if emb.device != self.device:  # first use, or the model moved since
            emb = emb.to(self.device)
            self._text_embeddings[spec] = (names, emb)
        return names, emb

    def set_custom_vocabulary(self, names: Sequence[str]) -> None:
        """Replace the "custom" vocabulary (its embeddings are computed on next use)."""
        self.custom_vocabulary = check_vocabulary(names, "the custom vocabulary")
        self._text_embeddings.pop("custom", None)

    # ------------------------------------------------------------------ encoders
    def _autocast(self):
        """The frozen encoders' precision: MODEL.REGIONSPOT.AUTOCAST, whatever autocast surrounds
        the call (e.g. AMP training), so cached text embeddings never depend on the caller."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_images(self, images: List[torch.Tensor]):
        """Frozen image features: SAM embeddings (B, C, h, w), SAM input sizes, CLIP tokens (B, L, W)."""
        with self._autocast():
            pre = [self.sam_encoder.preprocess(img) for img in images]
            sam_emb = self.sam_encoder.encode_images(torch.stack([p[0] for p in pre]))
            clip_in = torch.stack([self.clip_encoder.preprocess(img) for img in images])
            clip_tokens = self.clip_encoder.encode_image_tokens(clip_in)
        return sam_emb, [p[1] for p in pre], clip_tokens.float()

    @torch.no_grad()
    def decode_regions(self, sam_embedding: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]):
        """Region tokens (N, C) and low-res mask logits (N, 1, h, w) for boxes of one image."""
        with self._autocast():
            tokens, low_res = self.sam_encoder.decode_boxes(sam_embedding, boxes, image_size)
        return tokens.float(), low_res

    def embed_regions(self, tokens: List[torch.Tensor], clip_tokens: torch.Tensor) -> List[torch.Tensor]:
        """Run the head on each image's region tokens; returns per image (N_i, D) embeddings."""
        counts = [t.shape[0] for t in tokens]
        out = [t.new_zeros((0, self.clip_encoder.text_dim)) for t in tokens]
        busy = [i for i, n in enumerate(counts) if n > 0]  # an image with no regions has nothing to attend
        if not busy:
            return out
        n_max = max(counts[i] for i in busy)
        padded = tokens[busy[0]].new_zeros((len(busy), n_max, tokens[busy[0]].shape[-1]))
        pad_mask = torch.ones((len(busy), n_max), dtype=torch.bool, device=padded.device)
        for j, i in enumerate(busy):
            padded[j, : counts[i]] = tokens[i]
            pad_mask[j, : counts[i]] = False
        emb = self.head(padded, clip_tokens[busy], pad_mask)
        for j, i in enumerate(busy):
            out[i] = emb[j, : counts[i]]
        return out

    def classify(self, region_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) = exp(CLIP logit_scale) * cosine(region, class)."""
        return self.clip_encoder.logit_scale.float() * region_emb @ text_emb.t().to(region_emb.dtype)

    # ------------------------------------------------------------------ forward
    def _rgb_images(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """The inputs' (3, H, W) images on the device, in RGB whatever INPUT.FORMAT the loader used."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        return [img.flip(0) for img in images] if self.input_format == "BGR" else images

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        return self.losses(batched_inputs)

    def _prompts(self, x: Dict, image: torch.Tensor, sam_embedding: torch.Tensor,
                 input_size: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Box prompts (N, 4, XYXY in image pixels) and their scores (or None) for one input."""
        where = f" of image {x.get('file_name', x.get('image_id', '?'))}"
        if self.prompt == "gt":
            if "instances" not in x:
                raise KeyError(f"PROMPT='gt' needs the ground-truth 'instances'{where}; build the loader "
                               "with RegionSpotDatasetMapper, which keeps them at test time.")
            return x["instances"].gt_boxes.tensor.to(self.device), None
        if self.prompt == "proposals":
            if "proposals" not in x:
                raise KeyError(f"PROMPT='proposals' needs 'proposals'{where}; set DATASETS.PROPOSAL_FILES_TEST.")
            p = x["proposals"]
            scores = None
            if p.has("scores"):
                scores = p.scores
            elif p.has("objectness_logits"):
                scores = p.objectness_logits.sigmoid()
            scores = scores.to(self.device).float() if (scores is not None and self.use_proposal_score) else None
            return p.proposal_boxes.tensor.to(self.device), scores
        return self.sam_encoder.auto_boxes(image, sam_embedding, input_size, self.sam_auto_params), None

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Returns, per input, {"instances": Instances} at the input's "height" x "width"."""
        images = self._rgb_images(batched_inputs)
        sizes = [tuple(img.shape[-2:]) for img in images]
        sam_emb, input_sizes, clip_tokens = self.encode_images(images)
        prompts = []
        for i, (x, img, size) in enumerate(zip(batched_inputs, images, sizes)):
            boxes, scores = self._prompts(x, img, sam_emb[i], input_sizes[i])
            boxes = boxes.float().clone()
            keep = sanitize_boxes(boxes, size, f" of image {x.get('file_name', x.get('image_id', '?'))}")
            prompts.append((boxes[keep], scores[keep] if scores is not None else None))

        decoded = [self.decode_regions(sam_emb[i], prompts[i][0], sizes[i]) for i in range(len(images))]
        region_emb = self.embed_regions([d[0] for d in decoded], clip_tokens)

        results = []
        for i, x in enumerate(batched_inputs):
            out_size = (x.get("height", sizes[i][0]), x.get("width", sizes[i][1]))
            _, text_emb = self.text_embeddings(x.get("vocabulary"))
            results.append({"instances": self._postprocess(
                region_emb[i], text_emb, prompts[i][0], prompts[i][1], decoded[i][1],
                sizes[i], input_sizes[i], out_size,
            )})
        return results

    def _postprocess(
        self, region_emb, text_emb, boxes, proposal_scores, low_res, image_size, input_size, out_size
    ) -> Instances:
        """Top-K (box, class) pairs of one image, with one mask per kept box."""
        result = Instances(out_size)
        num_classes = text_emb.shape[0]
        probs = self.classify(region_emb, text_emb).softmax(dim=-1)
        if proposal_scores is not None:
            probs = probs * proposal_scores[:, None]
        k = min(self.max_dets_per_image, probs.numel())
        scores, flat = probs.flatten().topk(k)
        box_idx, classes = flat // num_classes, flat % num_classes
        scale = boxes.new_tensor([out_size[1] / image_size[1], out_size[0] / image_size[0]]).repeat(2)
        result.pred_boxes = Boxes(boxes[box_idx] * scale)
        result.scores = scores
        result.pred_classes = classes
        if self.mask_on:
            unique, inverse = torch.unique(box_idx, return_inverse=True)
            masks = self.sam_encoder.paste_masks(low_res[unique], input_size, out_size, fast=self.fast_mask_paste)
            result.pred_masks = IndexedMasks(masks, inverse)
        return result

    # ------------------------------------------------------------------ training
    def region_tokens_for_training(self, batched_inputs: List[Dict], images: List[torch.Tensor], sam_emb):
        tokens = []
        for i, x in enumerate(batched_inputs):
            if "sam_tokens" in x:  # cached mode: tokens were extracted offline for these boxes
                tokens.append(x["sam_tokens"].to(self.device).float())
            else:
                boxes = x["instances"].gt_boxes.tensor.to(self.device)
                tokens.append(self.decode_regions(sam_emb[i], boxes, tuple(images[i].shape[-2:]))[0])
        return tokens

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss of each gt region against its class in the image's vocabulary."""
        images = self._rgb_images(batched_inputs)
        online = any("sam_tokens" not in x for x in batched_inputs)
        with torch.no_grad(), self._autocast():
            sam_emb = None
            if online:
                pre = [self.sam_encoder.preprocess(img)[0] for img in images]
                sam_emb = self.sam_encoder.encode_images(torch.stack(pre))
            clip_in = torch.stack([self.clip_encoder.preprocess(img) for img in images])
            clip_tokens = self.clip_encoder.encode_image_tokens(clip_in).float()
        tokens = self.region_tokens_for_training(batched_inputs, images, sam_emb)
        region_emb = self.embed_regions(tokens, clip_tokens)
        # A zero that touches every head parameter: keeps backward (and DDP's reducer) valid for
        # a batch whose crops dropped every box.
        total = sum(p.sum() for p in self.head.parameters()) * 0.0
        num_regions = 0
        for x, emb in zip(batched_inputs, region_emb):
            _, text_emb = self.text_embeddings(x.get("vocabulary"))
            logits = self.classify(emb, text_emb)
            targets = F.one_hot(x["instances"].gt_classes.to(self.device), text_emb.shape[0]).float()
            # Mean over classes, times the number of classes: the sum over classes.
            total = total + sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").sum()
            num_regions += emb.shape[0]
        # Summed over regions and normalised by their number: the reference's
        # `loss.mean(1).sum() / num_boxes * num_classes` on (regions, classes) logits.
        return {"loss_focal": total / max(num_regions, 1)}
