"""Example images for the demos, made offline."""
import os
from typing import List, Optional, Tuple

from ..data.synthetic import make_synthetic_lvis
from ..modeling.text_embeddings import default_cache_dir

NUM_EXAMPLES = 4


def synthetic_examples(folder: Optional[str] = None, num: int = NUM_EXAMPLES) -> Tuple[List[str], str]:
    """A few synthetic shapes images (the quickstart's kind, larger; generated once, offline, under
    $REGIONSPOT_CACHE): (their paths, their LVIS-format json)."""
    folder = folder or os.path.join(default_cache_dir(), "web_demo_examples")
    json_path = make_synthetic_lvis(folder, "examples", num_images=num, seed=7, image_size=(384, 512))
    return [os.path.join(folder, "examples", f"examples_{i:05d}.png") for i in range(num)], json_path
