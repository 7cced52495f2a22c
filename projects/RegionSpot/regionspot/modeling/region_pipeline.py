"""RegionSpot's region pipeline: the steps every entry point shares.

image features (SAM embedding, CLIP token map) -> region prompts to SAM tokens and low-res masks
-> fusion head -> class logits and probabilities against a vocabulary -> one of two selection
policies -> masks pasted once per kept region. The meta-architecture, the ROI head, the predictor,
the demo, the benchmark and token extraction all call these, so each step exists once.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from ..config import check_regionspot_config
from .encoders import build_clip_encoder, build_sam_encoder
from .encoders.build import check_encoder_config
from .encoders.clip_encoder import ClipImageTextEncoder
from .encoders.region_encoder import RegionEncoderBase
from .head import RegionSpotHead
from ..structures import IndexedMasks
from .text_embeddings import get_templates
from .vocabulary import Vocabulary, VocabularyLike

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def compile_frozen(sam_encoder: RegionEncoderBase, clip_encoder: ClipImageTextEncoder, mode: str,
                   autocast: bool = False) -> None:
    """torch.compile the networks that dominate inference time, in place: each encoder names
    them (`compile_targets`). `Module.compile` keeps parameter names, so checkpoints load as
    before, and hooks on the compiled modules keep working."""
    for module in (*sam_encoder.compile_targets(autocast), *clip_encoder.compile_targets(autocast)):
        module.compile(mode=None if mode == "default" else mode)


def frozen_precision(device: torch.device, autocast: str = ""):
    """The frozen encoders' precision context: `autocast` ("", "bf16", "fp16") and nothing else,
    whatever autocast surrounds the call (e.g. AMP training), so cached text embeddings never
    depend on the caller."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"Unknown autocast {autocast!r} (MODEL.REGIONSPOT.AUTOCAST); choose '', 'bf16' or 'fp16'.")
    device_type = torch.device(device).type
    if AUTOCAST_DTYPES[autocast] is None:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[autocast])


# ------------------------------------------------------------------ the two selection policies
def top_pairs(probs: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image policy (evaluation): the k best (region, class) pairs of an (N, C) score matrix,
    so a region may carry several classes. Returns region indices, classes and scores, best first."""
    k = min(int(k), probs.numel())
    scores, flat = probs.flatten().topk(k)
    return flat // probs.shape[1], flat % probs.shape[1], scores


def top_classes(probs: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-region policy (predictor, demo): each region's k best classes, (N, k) scores and classes."""
    return probs.topk(min(int(k), probs.shape[1]), dim=-1)


def focal_loss_per_image(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The original's training loss of one image: sigmoid focal loss (alpha 0.25, gamma 2) against
    one-hot labels, summed over classes and averaged over the image's regions. The batch loss is
    the sum of these over the images of the (per-process) batch."""
    targets = F.one_hot(classes.to(logits.device), logits.shape[1]).float()
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    return loss.sum() / max(logits.shape[0], 1)


class RegionPipeline(nn.Module):
    """Frozen SAM + frozen CLIP + the trainable fusion head, with the pipeline's steps.

    Submodule names (`sam_encoder`, `clip_encoder`, `head`) are the checkpoint layout.
    """

    @configurable
    def __init__(
        self,
        *,
        sam_encoder: RegionEncoderBase,
        clip_encoder: ClipImageTextEncoder,
        head: RegionSpotHead,
        vocabulary: str = "",
        custom_vocabulary: Sequence[str] = (),
        templates: Sequence[str] = ("a photo of a {}.",),
        text_cache_dir: str = "",
        text_chunk_size: int = 256,
        autocast: str = "",
        compile_mode: str = "",
        mask_on: bool = True,
        fast_mask_paste: bool = True,
    ):
        """
        Args:
            sam_encoder: frozen SAM wrapper giving region tokens and masks (`SamRegionEncoder`, or
                `Sam2RegionEncoder` for the SAM 2 types).
            clip_encoder: frozen CLIP wrapper giving the image token map and text embeddings.
            head: the trainable fusion head.
            vocabulary: default vocabulary spec (see `Vocabulary`).
            custom_vocabulary: class names of the vocabulary "custom".
            templates: prompt templates averaged into each class embedding.
            text_cache_dir: folder of the text-embedding cache ("" = default).
            text_chunk_size: prompts per text-encoder call.
            autocast: "", "bf16" or "fp16": mixed precision of the frozen encoders.
            compile_mode: "" or a torch.compile mode for the frozen networks (`compile_frozen`).
            mask_on: predict masks.
            fast_mask_paste: paste masks with one interpolation (see RegionEncoderBase.paste_masks).
        """
        super().__init__()
        frozen_precision("cpu", autocast)  # validates the name
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"Unknown compile mode {compile_mode!r} (MODEL.REGIONSPOT.COMPILE); choose one of "
                             f"{COMPILE_MODES}.")
        self.sam_encoder = sam_encoder
        self.clip_encoder = clip_encoder
        self.head = head
        for p in list(sam_encoder.parameters()) + list(clip_encoder.parameters()):
            p.requires_grad_(False)
        self.autocast_name = autocast
        if compile_mode:
            compile_frozen(sam_encoder, clip_encoder, compile_mode, autocast=bool(autocast))
        self.mask_on = mask_on
        self.fast_mask_paste = fast_mask_paste
        self.vocabulary = Vocabulary(
            clip_encoder, default=vocabulary, custom=custom_vocabulary, templates=templates,
            cache_dir=text_cache_dir, chunk_size=text_chunk_size, precision=self.autocast,
        )
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        check_regionspot_config(cfg)  # before any (slow) build: a bad value fails at once
        check_encoder_config(cfg)
        c = cfg.MODEL.REGIONSPOT
        sam_encoder = build_sam_encoder(cfg)
        clip_encoder = build_clip_encoder(cfg)
        head = RegionSpotHead(cfg, token_dim=sam_encoder.token_dim, clip_width=clip_encoder.width,
                              text_dim=clip_encoder.text_dim)
        return {
            "sam_encoder": sam_encoder, "clip_encoder": clip_encoder, "head": head,
            "vocabulary": c.VOCABULARY, "custom_vocabulary": c.CUSTOM_VOCABULARY,
            "templates": get_templates(c.TEXT.TEMPLATES), "text_cache_dir": c.TEXT.CACHE_DIR,
            "text_chunk_size": c.TEXT.CHUNK_SIZE, "autocast": c.AUTOCAST, "compile_mode": c.COMPILE,
            "mask_on": c.MASK_ON, "fast_mask_paste": c.FAST_MASK_PASTE,
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

    def autocast(self):
        """The frozen encoders' precision: MODEL.REGIONSPOT.AUTOCAST, whatever autocast surrounds
        the call (e.g. AMP training), so cached text embeddings never depend on the caller."""
        return frozen_precision(self.device, self.autocast_name)

    # ------------------------------------------------------------------ steps
    def text_embeddings(self, vocabulary: Optional[VocabularyLike] = None) -> Tuple[List[str], torch.Tensor]:
        """(class names, (C, D) embeddings on the device) of a vocabulary; see `Vocabulary`."""
        return self.vocabulary.embeddings(vocabulary)

    @torch.no_grad()
    def encode_images(self, images: List[torch.Tensor], sam: bool = True):
        """Frozen image features of (3, H, W) RGB images: SAM features indexable by image (SAM:
        (B, C, h, w) embeddings; SAM 2: a list of `Sam2Features`; None when `sam` is False, e.g.
        training on cached tokens), SAM input sizes, CLIP tokens (B, L, W)."""
        sam_emb, input_sizes = None, []
        with self.autocast():
            if sam:
                pre = [self.sam_encoder.preprocess(img) for img in images]
                sam_emb = self.sam_encoder.encode_images(torch.stack([p[0] for p in pre]))
                input_sizes = [p[1] for p in pre]
            clip_in = torch.stack([self.clip_encoder.preprocess(img) for img in images])
            clip_tokens = self.clip_encoder.encode_image_tokens(clip_in)
        return sam_emb, input_sizes, clip_tokens.float()

    @torch.no_grad()
    def decode_regions(self, sam_embedding: torch.Tensor, image_size: Tuple[int, int],
                       boxes: Optional[torch.Tensor] = None, points: Optional[torch.Tensor] = None,
                       point_labels: Optional[torch.Tensor] = None, masks: bool = True
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Region tokens (N, C) and low-res mask logits (N, 1, h, w) of one image's prompts: boxes
        (N, 4) XYXY and/or points (N, P, 2) with labels, in the pixels of the `image_size` image.
        With `masks=False` the decoder stops at the tokens (same tokens) and the logits are None."""
        with self.autocast():
            tokens, low_res = self.sam_encoder.decode_prompts(
                sam_embedding, image_size, boxes=boxes, points=points, point_labels=point_labels, masks=masks)
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

    def probabilities(self, region_emb: torch.Tensor, text_emb: torch.Tensor,
                      prompt_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, C) softmax over the vocabulary, times each prompt's own score when there is one."""
        probs = self.classify(region_emb, text_emb).softmax(dim=-1)
        return probs if prompt_scores is None else probs * prompt_scores[:, None]

    def paste_masks(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                    out_size: Tuple[int, int], return_windows: bool = False):
        """Boolean (N, H, W) masks at `out_size` from SAM's low-res logits of the kept regions (and
        with `return_windows` their windows, see `RegionEncoderBase.paste_masks`)."""
        return self.sam_encoder.paste_masks(low_res, input_size, out_size, fast=self.fast_mask_paste,
                                            return_windows=return_windows)

    def detections(self, probs: torch.Tensor, boxes: torch.Tensor, low_res: Optional[torch.Tensor],
                   image_size: Tuple[int, int], input_size: Tuple[int, int], out_size: Tuple[int, int],
                   max_dets: int, box_mask_size: int = 0) -> Instances:
        """Evaluation's output of one image: its `max_dets` best (box, class) pairs (`top_pairs`) as
        `Instances` at `out_size`, boxes rescaled from `image_size`, one mask per kept box shared by
        its classes (`IndexedMasks`, see `detection_masks`). With `box_mask_size`, masks are instead box-local
        probabilities of that side (`RegionEncoderBase.box_masks`), as detectron2's
        `detector_postprocess` expects them."""
        result = Instances(out_size)
        box_idx, classes, scores = top_pairs(probs, max_dets)
        scale = boxes.new_tensor([out_size[1] / image_size[1], out_size[0] / image_size[0]]).repeat(2)
        result.pred_boxes = Boxes(boxes[box_idx] * scale)
        result.scores = scores
        result.pred_classes = classes
        if self.mask_on and low_res is not None:
            unique, inverse = torch.unique(box_idx, return_inverse=True)
            if box_mask_size:
                masks = self.sam_encoder.box_masks(low_res[unique], input_size, image_size, boxes[unique], box_mask_size)
                result.pred_masks = masks[inverse]
            else:
                result.pred_masks = self.detection_masks(low_res[unique], input_size, out_size, inverse)
        return result

    def detection_masks(self, low_res: torch.Tensor, input_size: Tuple[int, int], out_size: Tuple[int, int],
                        index: torch.Tensor) -> IndexedMasks:
        """Masks at `out_size` of the kept boxes' low-res logits, mask `index[i]` for detection i:
        run lengths found from the logits on their device (`paste_masks_rle`), or, for masks so
        noisy that pasting is cheaper (random SAM weights; `run_lengths_pay_off`) and for the plain
        paste (`FAST_MASK_PASTE False`), (N, H, W) pastes with their windows, which the evaluator
        encodes."""
        enc, fast = self.sam_encoder, self.fast_mask_paste
        windows = enc.mask_windows(low_res, input_size, out_size, fast)
        if fast and enc.run_lengths_pay_off(low_res, input_size, out_size, windows):
            return IndexedMasks(enc.paste_masks_rle(low_res, input_size, out_size, fast, windows), index)
        masks = enc.paste_masks(low_res, input_size, out_size, fast=fast, windows=windows)
        return IndexedMasks(masks, index, windows)

    def recognize(self, sam_emb: torch.Tensor, input_sizes: List[Tuple[int, int]], clip_tokens: torch.Tensor,
                  image_sizes: List[Tuple[int, int]], boxes: List[torch.Tensor],
                  vocabularies: Sequence[Optional[VocabularyLike]],
                  prompt_scores: Optional[List[Optional[torch.Tensor]]] = None) -> List[Dict]:
        """Boxes of each image (XYXY in its `image_sizes` pixels) -> per image a dict with
        `probs` (N, C), `low_res` mask logits (None unless `mask_on`) and the vocabulary's `names`."""
        decoded = [self.decode_regions(sam_emb[i], image_sizes[i], boxes=boxes[i], masks=self.mask_on)
                   for i in range(len(boxes))]
        region_emb = self.embed_regions([d[0] for d in decoded], clip_tokens)
        out = []
        for i, (emb, (_, low_res)) in enumerate(zip(region_emb, decoded)):
            names, text_emb = self.text_embeddings(vocabularies[i])
            scores = None if prompt_scores is None else prompt_scores[i]
            out.append({"probs": self.probabilities(emb, text_emb, scores), "low_res": low_res, "names": names})
        return out

    def region_losses(self, tokens: List[torch.Tensor], clip_tokens: torch.Tensor, classes: List[torch.Tensor],
                      vocabularies: Sequence[Optional[VocabularyLike]]) -> torch.Tensor:
        """The training loss of a batch: `focal_loss_per_image` summed over its images. Images whose
        crops dropped every box add nothing; the result still touches every head parameter, so
        backward (and DDP's reducer) stay valid."""
        region_emb = self.embed_regions(tokens, clip_tokens)
        total = sum(p.sum() for p in self.head.parameters()) * 0.0
        for emb, cls, vocab in zip(region_emb, classes, vocabularies):
            if emb.shape[0]:
                total = total + focal_loss_per_image(self.classify(emb, self.text_embeddings(vocab)[1]), cls)
        return total


def find_pipeline(model: nn.Module) -> RegionPipeline:
    """The RegionPipeline inside a model: the RegionSpot meta-architecture itself, or the
    `RegionSpotROIHeads` of a GeneralizedRCNN (through DDP's `.module` too)."""
    for m in model.modules():
        if isinstance(m, RegionPipeline):
            return m
    raise ValueError(f"{type(model).__name__} holds no RegionSpot pipeline (neither the RegionSpot "
                     "meta-architecture nor RegionSpotROIHeads).")
