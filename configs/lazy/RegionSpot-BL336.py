# RegionSpot-BL@336: SAM ViT-B + CLIP ViT-L/14@336px at 336 (= configs/RegionSpot-BL336.yaml; training
# as configs/train/RegionSpot-BL336_stage1_o365.yaml).
from .common import dataloader, lr_multiplier, model, optimizer, train

model.clip.name = "ViT-L/14@336px"
model.clip.input_size = 336
train.output_dir = "output/RegionSpot-BL336"
