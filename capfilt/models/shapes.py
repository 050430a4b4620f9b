"""Model shapes: the released BLIP architectures and the tiny ones of tests and demos."""

from __future__ import annotations

# The tiny shapes of tests, the demo and `pretrain --preset tiny`.
TINY_TEXT = dict(
    hidden_size=64,
    encoder_hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,
)


# A small BLIP for benchmarks on a laptop (`capfilt bench --arch small`): twice the tiny width,
# four layers on each side, 96 px. A speed-up must hold here too, not on the tiny shapes only.
SMALL_TEXT = dict(
    TINY_TEXT,
    hidden_size=128,
    encoder_hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
)


SMALL_VISION = dict(
    TINY_VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, image_size=96
)


# The released BLIP architectures (as in Salesforce's checkpoints, at 384 px): ViT-B/16 or
# ViT-L/16 vision, BERT-base text.
VIT_B16 = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=384,
    patch_size=16,
)


VIT_L16 = dict(
    VIT_B16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
)


BERT_BASE = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
)


# MED pretrains at 224 px as in the paper. BlipVisionConfig's default initializer_range (1e-10)
# suits loading released weights only: trained from scratch, every image would start with the
# same features.
PRETRAIN_VIT_B16 = dict(VIT_B16, image_size=224, initializer_range=0.02)
PRETRAIN_VIT_L16 = dict(VIT_L16, image_size=224, initializer_range=0.02)


# Which layers MED's text decoder shares with its text encoder, as BLIP's Table 3 ablates: the
# parts of each BlipTextLayer the decoder takes from the encoder. The embeddings, and with them
# the LM head's output matrix, are shared in all but `none`. BLIP's choice comes first.
MED_SHARING = {
    "all-but-sa": ("crossattention", "intermediate", "output"),
    "all": ("attention", "crossattention", "intermediate", "output"),
    "all-but-ca": ("attention", "intermediate", "output"),
    "none": (),
}
DEFAULT_SHARING = "all-but-sa"
