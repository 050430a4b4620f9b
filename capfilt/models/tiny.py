"""Tiny BLIP models built from configs, and WordPiece tokenizers trained on the fly.

No machine here reaches the Hugging Face hub, so tests, the offline demo and `pretrain
--preset tiny` build their models from these configs. The files saved are ordinary Hugging
Face BLIP checkpoints (safetensors), loaded by the same code as the released ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# BLIP's specials: [DEC] starts generation (the decoder's BOS), [ENC] replaces [CLS] as the
# first token of image-grounded encoding in BLIP's training.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]

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


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, out_dir: str | Path | None = None
):
    """Train a lower-cased WordPiece tokenizer with the BLIP specials; save it if `out_dir`."""
    from tokenizers import Tokenizer, models
    from tokenizers.trainers import WordPieceTrainer

    tok = bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = as_blip_tokenizer(tok)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def bert_pipeline(tok):
    """Give a `tokenizers.Tokenizer` BERT's lower-casing normaliser, splitting and decoding."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def as_blip_tokenizer(tok):
    """Wrap a WordPiece `tokenizers.Tokenizer` holding the BLIP specials as a transformers one."""
    from tokenizers import processors
    from transformers import BertTokenizerFast

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        do_lower_case=True,
    )


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
