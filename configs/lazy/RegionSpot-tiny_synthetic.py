# Offline quickstart (= configs/quickstart/RegionSpot-tiny_synthetic.yaml): a tiny SAM and a tiny CLIP
# pretrained on the synthetic shapes world (shipped inside the package), on the CPU. Training reads the SAM tokens tools/quickstart.py caches
# (or set dataloader.train.token_mode=online).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .common import dataloader, lr_multiplier, model, optimizer, train

model.sam.type = "tiny"
model.sam.checkpoint = "regionspot://pretrained/tiny_sam_synthetic.pth.gz"
model.clip.name = "tiny"
model.clip.checkpoint = "regionspot://pretrained/tiny_clip_synthetic.pth.gz"
model.clip.input_size = 96         # the size it was pretrained at: a 12 x 12 token map
model.templates.name = "single"
model.head.dim_feedforward = 256

dataloader.train.names = ["synthetic_shapes_train"]
dataloader.train.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160, 192, 224), max_size=320, sample_style="choice"),
]
dataloader.train.token_cache_dir = "output/quickstart/sam_tokens"
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0
dataloader.test.dataset.name = "synthetic_shapes_val"
# The synthetic images are small: no test-time upscaling to 800 (MIN_SIZE_TEST 0).
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=0, max_size=1333, sample_style="choice"),
]
dataloader.test.num_workers = 0

optimizer.lr = 0.003               # a head trained from scratch on tiny encoders wants more than 2.5e-5
lr_multiplier.steps = [300]
lr_multiplier.warmup_iters = 20
train.max_iter = 400
train.checkpointer.period = 200
train.amp.enabled = False
train.eval_period = 200
train.seed = 0                     # reproducible quickstart numbers
train.device = "cpu"
train.output_dir = "output/quickstart_lazy"
