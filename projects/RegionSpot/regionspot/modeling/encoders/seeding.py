"""Seeded random initialisation, shared by every encoder family.

A frozen encoder built without a checkpoint ("random", the tiny test models) must be the same in
every build and every process, so that cached tokens, evaluation and DDP ranks agree. Its weights
come from a fixed seed, drawn without touching the global RNG.
"""
import contextlib
from typing import Iterator

import torch

# The seed of a random initialisation when none is given (MODEL.REGIONSPOT.RANDOM_INIT_SEED's default).
RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def seeded_random_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Within the block, torch's CPU RNG starts from `seed`; the global RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
