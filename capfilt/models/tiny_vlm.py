"""Tiny random vision-language captioners built from configs: BLIP-2, LLaVA, Idefics3
(SmolVLM's architecture) and PaliGemma.

The hub is out of reach here, so the tests and `capfilt bench caption --arch blip2-tiny` (…)
build these: each is saved as an ordinary Hugging Face checkpoint (safetensors, config,
processor, a WordPiece tokenizer trained on the fly with the family's special tokens and a
chat template where the family has one) and is loaded by the same code as a released one.
Image processors are the PIL ones (no torchvision)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from capfilt.models.shapes import TINY_VISION

# The families built here, by the name `bench --arch` gives them.
TINY_VLMS = ("blip2-tiny", "llava-tiny", "idefics3-tiny", "paligemma-tiny")

_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>"]
_FAMILY_TOKENS = {
    "blip2-tiny": ["<image>"],
    "llava-tiny": ["<image>"],
    "idefics3-tiny": [
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        "<end_of_utterance>",
        *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    ],
    "paligemma-tiny": ["<image>"],
}
# Chat templates in the families' own layout, cut down to a user turn of images and text.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_TEXTS = [
    f"a {color} {shape} on a white background"
    for color in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
] + ["describe this image in one sentence.", "a picture of", "user assistant caption"]


def lm_tokenizer(family: str, texts: Iterable[str] = _TEXTS, vocab_size: int = 300):
    """A lower-cased WordPiece tokenizer for a decoder-only language model: <pad> <unk> <s>
    </s>, the family's special tokens, every character seen (alone and as `##` continuation)
    and the most frequent words (ties alphabetical), the same for the same texts."""
    from transformers import PreTrainedTokenizerFast

    from capfilt.models.tokenizers import wordpiece_tokenizer

    backend = wordpiece_tokenizer(texts, _SPECIALS, "<unk>", vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=list(_FAMILY_TOKENS[family]),
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _llama_text(tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def _clip_image_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def build_blip2(out_dir: Path, seed: int = 0):
    """BLIP-2: a ViT, a Q-Former of 8 queries and an OPT language model, all width 64."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from capfilt.models.tiny import image_processor

    tokenizer = lm_tokenizer("blip2-tiny")
    qformer = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=64,
        vocab_size=len(tokenizer),
    )
    text = dict(
        model_type="opt",
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=dict(TINY_VISION),
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=8,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    processor = Blip2Processor(
        image_processor=image_processor(64), tokenizer=tokenizer, num_query_tokens=8
    )
    return _save(Blip2ForConditionalGeneration, config, processor, out_dir, seed)


def build_llava(out_dir: Path, seed: int = 0):
    """LLaVA: a CLIP ViT (64 px, 16 px patches: 16 image tokens), an MLP, a Llama."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = lm_tokenizer("llava-tiny")
    vision = dict(TINY_VISION, model_type="clip_vision_model", projection_dim=64)
    config = LlavaConfig(
        vision_config=vision,
        text_config=dict(model_type="llama", **_llama_text(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(64),
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return _save(LlavaForConditionalGeneration, config, processor, out_dir, seed)


def build_idefics3(out_dir: Path, seed: int = 0):
    """Idefics3 (SmolVLM's architecture): a SigLIP ViT, a pixel shuffle of 2 x 2 patches and
    a Llama; an image of more than 64 px is cut into 64 px tiles plus a global view."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tokenizer = lm_tokenizer("idefics3-tiny")
    config = Idefics3Config(
        vision_config=dict(TINY_VISION),
        text_config=dict(model_type="llama", **_llama_text(tokenizer)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 64}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(64 // 16) ** 2 // 2**2,
        chat_template=IDEFICS3_TEMPLATE,
    )
    return _save(Idefics3ForConditionalGeneration, config, processor, out_dir, seed)


def build_paligemma(out_dir: Path, seed: int = 0):
    """PaliGemma: a SigLIP ViT (64 px, 16 image tokens) and a Gemma language model that reads
    the image and the prompt as a prefix; a plain prompt ("caption en"), no chat template."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = lm_tokenizer("paligemma-tiny")
    image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    image_processor.image_seq_length = (64 // 16) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _llama_text(tokenizer, head_dim=16)  # after the processor's location tokens
    config = PaliGemmaConfig(
        vision_config=dict(TINY_VISION, model_type="siglip_vision_model", projection_dim=64),
        text_config=dict(model_type="gemma", **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
    )
    return _save(PaliGemmaForConditionalGeneration, config, processor, out_dir, seed)


BUILDERS = {
    "blip2-tiny": build_blip2,
    "llava-tiny": build_llava,
    "idefics3-tiny": build_idefics3,
    "paligemma-tiny": build_paligemma,
}


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a random tiny captioner of `family` (one of TINY_VLMS) with its processor."""
    return BUILDERS[family](Path(out_dir), seed)


def _save(cls, config, processor, out_dir: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
