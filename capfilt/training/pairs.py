"""Training pairs: image-text rows of the datasets, decoded and augmented for MED."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from capfilt.core.errors import CapfiltError

# BLIP's image normalisation (the CLIP mean and std), as in its released processors.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)


IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def pre_caption(text: str, max_words: int) -> str:
    """BLIP's caption clean-up: lower case, punctuation to spaces, at most `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip().rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


@dataclass
class TrainingPairs:
    """Image-text pairs in memory: texts and the index of each one's image bytes."""

    texts: list[str]
    image_index: list[int]
    images: list[bytes]
    keys: list[str]
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def load_pairs(
    datasets: tuple[str, ...], source: str = "all", max_words: int = 30
) -> TrainingPairs:
    """The training pairs of one or more datasets: `curated/` when filtered, else web captions.

    A curated row is joined to its image on `key` (several texts may share an image). Rows
    that cannot train are counted in `skipped` by reason, never dropped silently.
    """
    from capfilt.core.layout import Dataset
    from capfilt.images.decode import decode_image

    pairs = TrainingPairs([], [], [], [])
    skipped: dict[str, int] = {}
    for root in datasets:
        ds = Dataset(root)
        shards = ds.require_stage("images", "fetch or ingest images first (capfilt fetch/ingest)")
        image_of: dict[str, int] = {}  # key → index in pairs.images
        unusable: dict[str, str] = {}  # key → why its image cannot train
        for shard in shards:
            table = ds.read_shard("images", shard, columns=["key", "status", "jpg"])
            for key, status, jpg in zip(
                table.column("key").to_pylist(),
                table.column("status").to_pylist(),
                table.column("jpg").to_pylist(),
                strict=True,
            ):
                if status != "success" or not jpg:
                    unusable[key] = "image not downloaded"
                elif not decode_image(jpg).ok:
                    unusable[key] = "image not decodable"
                else:
                    image_of[key] = len(pairs.images)
                    pairs.images.append(jpg)
        curated = ds.folder("curated")  # one generation, whatever a filter run does meanwhile
        if curated.shards():
            _refuse_stale(ds, curated)
            rows = curated.read_all(columns=["key", "source", "text"]).to_pylist()
        else:
            if source == "synthetic":
                raise CapfiltError(
                    f"{root!r} has no curated/ shards, so no synthetic captions to train on; "
                    "run `capfilt caption` and `capfilt filter` first, or pass --source web"
                )
            rows = []
            for shard in shards:
                table = ds.read_shard("images", shard, columns=["key", "caption"])
                rows += [
                    dict(key=k, source="web", text=t)
                    for k, t in zip(
                        table.column("key").to_pylist(),
                        table.column("caption").to_pylist(),
                        strict=True,
                    )
                ]
        for row in rows:
            if source != "all" and row["source"] != source:
                continue
            index = image_of.get(row["key"])
            text = pre_caption(row["text"] or "", max_words)
            reason = None
            if index is None:
                reason = unusable.get(row["key"], "no image with this key")
            elif not text:
                reason = "empty text"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            pairs.texts.append(text)
            pairs.image_index.append(index)
            pairs.keys.append(row["key"])
    pairs.skipped = skipped
    if not pairs.texts:
        raise CapfiltError(
            f"no trainable image-text pairs in {', '.join(datasets)} "
            f"(source={source}; skipped: {skipped or 'none'})"
        )
    return pairs


def _refuse_stale(ds, curated) -> None:
    """Training on curated/ pairs whose images were replaced since would pair texts with other
    images (keys are reused): refuse, saying which stage to run."""
    from capfilt.core import provenance

    memo: dict = {}
    stale = [
        (shard, why)
        for shard in curated.shards()
        if (why := provenance.stale_ancestor(ds, "curated", shard, curated, memo))
    ]
    if stale:
        raise CapfiltError(
            f"curated/ of {ds.root!r} is stale in {len(stale)} shards "
            f"({provenance.shard_list([s for s, _ in stale])}: {stale[0][1]}); bring it up to "
            "date first (`capfilt status` says what changed; run caption and filter again)"
        )


def random_resized_crop(
    image, rng: random.Random, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
):
    """A crop of random area (a `scale` fraction) and aspect ratio, resized to size×size."""
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # fall back to the largest centred crop
        w, h = width, height
        top, left = 0, 0
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def to_pixels(image):
    """An RGB PIL image to a normalised float tensor (3, H, W)."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class PairDataset:
    """Map-style dataset of (pixels, text); augmentation is seeded by (seed, epoch, index)."""

    def __init__(
        self,
        pairs: TrainingPairs,
        image_size: int,
        seed: int,
        augment: bool = True,
        flip: bool = True,
        crop_scale=(0.5, 1.0),
    ):
        self.pairs, self.image_size, self.seed = pairs, image_size, seed
        self.augment, self.flip, self.crop_scale = augment, flip, tuple(crop_scale)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        from capfilt.images.decode import decode_image

        image = decode_image(self.pairs.images[self.pairs.image_index[index]]).image
        if self.augment:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            image = random_resized_crop(image, rng, self.image_size, self.crop_scale)
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_pixels(image), self.pairs.texts[index]


class Collate:
    """Stack pixels and tokenize texts (longest in batch, at most `max_length` tokens)."""

    def __init__(self, tokenizer, max_length: int, prefix: str = ""):
        self.tokenizer, self.max_length, self.prefix = tokenizer, max_length, prefix

    def __call__(self, items):
        import torch

        pixels, texts = zip(*items, strict=True)
        tokens = self.tokenizer(
            [self.prefix + t for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }


class EpochShuffle:
    """A sampler whose order is a pure function of (seed, epoch), so resume can replay it."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
