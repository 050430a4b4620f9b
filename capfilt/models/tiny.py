"""Tiny BLIP models built from configs, and WordPiece tokenizers trained on the fly.

No machine here reaches the Hugging Face hub, so tests, the offline demo and `pretrain
--preset tiny` build their models from these configs. The files saved are ordinary Hugging
Face BLIP checkpoints (safetensors), loaded by the same code as the released ones."""

from __future__ import annotations

from pathlib import Path

from capfilt.models.shapes import TINY_TEXT, TINY_VISION


def blip_config(tokenizer, text: dict | None = None, vision: dict | None = None):
    """A BlipConfig whose special-token ids and vocabulary match `tokenizer`."""
    from transformers import BlipConfig

    text_config = dict(TINY_TEXT if text is None else text)
    vision_config = dict(TINY_VISION if vision is None else vision)
    text_config.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    text_config.setdefault("encoder_hidden_size", vision_config["hidden_size"])
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=256,
        image_text_hidden_size=256,
    )


def image_processor(image_size: int):
    """BLIP's image processor (resize to a square, CLIP mean/std) at `image_size`."""
    from transformers import BlipImageProcessor

    try:
        return BlipImageProcessor(size={"height": image_size, "width": image_size})
    except (ImportError, ValueError):  # no torchvision: the PIL processor
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_tiny_blip(
    out_dir: str | Path,
    tokenizer,
    kind: str = "captioner",
    seed: int = 0,
    text: dict | None = None,
    vision: dict | None = None,
) -> Path:
    """Save a random BLIP captioner or filter (ITM) with its processor to `out_dir`."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    config = blip_config(tokenizer, text, vision)
    torch.manual_seed(seed)
    cls = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}[kind]
    model = cls(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = BlipProcessor(
        image_processor=image_processor(config.vision_config.image_size), tokenizer=tokenizer
    )
    processor.save_pretrained(out_dir)
    return out_dir
