"""Keyed randomness for sampling: every draw is a hash of (seed, position, token), not the
state of a shared generator, so a caption does not depend on its batch or process.

One 32-bit mixer serves both engines: the plain transformers path (`uniform_hash`, an inverse
CDF draw per row) and the fast path (`seeded_exponential`, an exponential race per token).
"""

from __future__ import annotations

import hashlib

MASK32 = 0xFFFFFFFF


def caption_seed(seed: int, key: str, caption_id: int) -> int:
    """The sampling seed of one caption, the same whatever batch or process its image is in."""
    digest = hashlib.blake2b(f"{seed}/{key}/{caption_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def mix32(h):
    """A 32-bit integer hash of int64 tensors or Python ints; multipliers below 2**31 keep the
    int64 products exact."""
    h = h & MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK32
    return h ^ (h >> 16)


def uniform_hash(seeds, step: int):
    """A uniform float64 in [0, 1) for each seed at position `step`, the same on every device."""
    h = mix32(mix32(seeds) ^ ((step * 0x9E3779B9) & MASK32))
    h = mix32(h ^ 0x85EBCA6B)
    return (h >> 8).double() / float(1 << 24)


def seeded_exponential(row_seeds, step: int, token_ids):
    """Exp(1) noise for `token_ids` (R, K) that depends only on the row's seed, step and token.

    A counter-based generator: a row's samples do not depend on which other rows share its
    batch, so captions are the same at any batch size or process count.
    """
    import torch

    step_key = mix32(step + 0x3C6EF372)  # a Python int: no host-to-device copy per step
    h = mix32(row_seeds[:, None] + step_key)
    h = mix32(h ^ ((token_ids * 0x27D4EB2D) & MASK32))
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(uniform)


def caption_row_seeds(seeds):
    """One 32-bit seed per caption row from one 64-bit seed per caption."""
    return mix32(mix32(seeds) ^ mix32((seeds >> 32) + 0x1B873593))


def image_row_seeds(seeds, num_captions: int):
    """One 32-bit seed per caption row from one seed per image (image-major rows)."""
    import torch

    seeds = seeds.to(torch.int64)
    image_seed = caption_row_seeds(seeds)
    caption = torch.arange(num_captions, device=seeds.device, dtype=torch.int64)
    return mix32(image_seed[:, None] * 31 + caption[None, :] + 0x68E31DA4).reshape(-1)
