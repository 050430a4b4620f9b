"""Training pairs: image-text rows of the datasets, decoded and augmented for MED."""

from __future__ import annotations

import math
import random
import re

from capfilt.core.errors import CapfiltError

# BLIP's image normalisation (the CLIP mean and std), as in its released processors.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)


IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def pre_caption(text: str, max_words: int) -> str:
    """BLIP's caption clean-up: lower case, punctuation to spaces, at most `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip().rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


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


class DecodeBatch:
    """Map-style dataset whose items are batches: a batch of (image bytes, text, key, seed)
    from `stream.EpochBatches` becomes pixels and tokens, in a DataLoader worker.

    Augmentation draws from the pair's own seed (seed, epoch, process, position), so a batch
    is the same whichever worker makes it. An image that cannot be decoded leaves the batch
    and is counted in `skipped`.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int,
        image_size: int,
        prefix: str = "",
        augment: bool = True,
        flip: bool = True,
        crop_scale=(0.5, 1.0),
    ):
        self.tokenizer, self.max_length, self.prefix = tokenizer, max_length, prefix
        self.image_size, self.augment = image_size, augment
        self.flip, self.crop_scale = flip, tuple(crop_scale)

    def pixels(self, data: bytes | None, seed: str):
        """Decoded, augmented and normalised pixels (3, S, S), or the reason there are none."""
        from PIL import Image

        from capfilt.images.decode import decode_image

        decoded = decode_image(data)
        if not decoded.ok:
            return None, "image not decodable"
        image = decoded.image
        if self.augment:
            rng = random.Random(seed)
            image = random_resized_crop(image, rng, self.image_size, self.crop_scale)
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_pixels(image), None

    def __getitem__(self, batch):
        import torch

        pixels, texts, keys, skipped = [], [], [], {}
        for data, text, key, seed in batch:
            values, why = self.pixels(data, seed)
            if values is None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            pixels.append(values)
            texts.append(text)
            keys.append(key)
        if not pixels:
            raise CapfiltError(
                f"no image of a batch of {len(batch)} pairs could be decoded ({skipped}); "
                "check the images of the training data"
            )
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
            "keys": keys,
            "skipped": skipped,
        }
