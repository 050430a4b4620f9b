"""Decoded images to model pixels through the checkpoint's own image processor."""

from __future__ import annotations


def processor_size(image_processor) -> tuple[int, int] | None:
    """(width, height) the image processor resizes to, or None when it has no fixed size."""
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    else:
        height, width = getattr(size, "height", None), getattr(size, "width", None)
    if height is None or width is None:
        return None
    return int(width), int(height)


def preprocess(image_processor, images: list) -> object:
    """Resize and normalise a list of RGB PIL images into a float32 tensor (N, 3, H, W)."""
    if _is_plain_pil_blip_processor(image_processor):
        return _pil_preprocess(image_processor, images)
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def _is_plain_pil_blip_processor(image_processor) -> bool:
    """True for transformers' PIL BLIP processor with its usual steps (no torchvision here).

    Its per-image NumPy round trips cost as much as a small model's forward pass; the same
    arithmetic in one batched tensor operation gives identical values (tests/test_data.py).
    """
    size = getattr(image_processor, "size", None)
    return (
        type(image_processor).__name__ == "BlipImageProcessorPil"
        and image_processor.do_resize
        and image_processor.do_rescale
        and image_processor.do_normalize
        and getattr(size, "height", None) is not None
        and getattr(size, "width", None) is not None
    )


def _pil_preprocess(image_processor, images: list):
    return normalize_pixels(image_processor, _pil_resize(image_processor, images))


def _pil_resize(image_processor, images: list):
    """The PIL processor's resize of every image, stacked: uint8 (N, 3, H, W)."""
    import numpy as np
    import torch
    from PIL import Image

    size = (image_processor.size.width, image_processor.size.height)
    resample = Image.Resampling(int(image_processor.resample))
    resized = np.stack(
        [np.asarray(_rgb(img).resize(size, resample=resample)) for img in images]
    )  # (N, H, W, 3) uint8
    return torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()


def _is_torchvision_processor(image_processor) -> bool:
    """transformers' torchvision-backed image processor, whose steps can be run separately."""
    return hasattr(image_processor, "rescale_and_normalize") and hasattr(
        image_processor, "do_normalize"
    )


def can_defer_normalization(image_processor) -> bool:
    """True when `resize_pixels` + `normalize_pixels` give exactly `preprocess`'s values."""
    return _is_plain_pil_blip_processor(image_processor) or (
        _is_torchvision_processor(image_processor)
        and type(image_processor).__name__ == "BlipImageProcessor"
        and not getattr(image_processor, "do_center_crop", False)
        and not getattr(image_processor, "do_pad", False)
    )


def resize_pixels(image_processor, images: list):
    """Resized, not yet rescaled or normalised pixels: uint8 (N, 3, H, W)."""
    if _is_plain_pil_blip_processor(image_processor):
        return _pil_resize(image_processor, images)
    return image_processor(
        images=images, do_rescale=False, do_normalize=False, return_tensors="pt"
    )["pixel_values"]


def normalize_pixels(image_processor, pixels):
    """The processor's rescale and normalisation of `resize_pixels`' output, on its device."""
    import torch

    if _is_plain_pil_blip_processor(image_processor):
        scale = float(image_processor.rescale_factor)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32, device=pixels.device)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32, device=pixels.device)
        # The same three operations in the same order, in place on the one float copy: the
        # values of `(pixels * scale - mean) / std`, without two more batch-sized tensors.
        pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return pixels.mul_(scale).sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    p = image_processor
    return p.rescale_and_normalize(
        pixels, p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std
    )


def _rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even RGB
