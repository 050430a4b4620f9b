"""Tiny random CLIP and SigLIP checkpoints, with byte-pair tokenizers trained on the fly.

For the tests of the similarity scorers (capfilt/models/clip.py): no machine here reaches the
hub. The folders saved are ordinary Hugging Face `CLIPModel`/`SiglipModel` checkpoints
(safetensors, a processor), loaded by the same code as the released ones.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def bpe_merges(words: list[list[str]], count: int) -> list[tuple[str, str]]:
    """The `count` byte-pair merges of `words` (each a list of symbols), most frequent pair
    first, ties in alphabetical order: the same merges for the same words in every process."""
    words = [list(w) for w in words]
    merges = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word in words:
            pairs.update(zip(word, word[1:], strict=False))
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i : i + 2] = [word[i] + word[i + 1]]
                i += 1
    return merges


def clip_tokenizer(texts: list[str], merges: int = 64):
    """A CLIPTokenizer (byte-level BPE, `</w>` word ends, <|startoftext|>/<|endoftext|>) whose
    merges are learnt from `texts`."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(symbol, len(vocab))
    splitter = CLIPTokenizer(vocab=dict(vocab), merges=[]).backend_tokenizer
    words = []
    for text in texts:
        normalized = splitter.normalizer.normalize_str(text)
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized):
            words.append([*word[:-1], word[-1] + "</w>"])
    learnt = bpe_merges(words, merges)
    for left, right in learnt:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=learnt)


def siglip_tokenizer(texts: list[str], merges: int = 64):
    """A lower-casing BPE tokenizer in SigLIP's manner: `▁` word starts, `</s>` appended and
    used for padding, 64 tokens. (Released SigLIP checkpoints ship a SentencePiece model.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    pre = pre_tokenizers.Metaspace()
    lower = normalizers.Lowercase()
    words = [
        list(word) for text in texts for word, _ in pre.pre_tokenize_str(lower.normalize_str(text))
    ]
    symbols = sorted({c for word in words for c in word} | set("abcdefghijklmnopqrstuvwxyz▁"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    learnt = bpe_merges(words, merges)
    for left, right in learnt:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=learnt, unk_token="<unk>"))
    tok.normalizer = lower
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return TokenizersBackend(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        model_max_length=64,
    )


def build_tiny_clip(out_dir: str | Path, texts: list[str], seed: int = 0, image_size: int = 32):
    """Save a random CLIPModel (77-token text window) with its processor to `out_dir`."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = clip_tokenizer(texts)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=dict(
            TINY_TOWER, vocab_size=len(tokenizer), max_position_embeddings=77, **special
        ),
        vision_config=dict(TINY_TOWER, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
    )
    return _save(model, processor, out_dir)


def build_tiny_siglip(
    out_dir: str | Path, texts: list[str], seed: int = 0, image_size: int = 32
) -> Path:
    """Save a random SiglipModel (64-token window) with its processor to `out_dir`. Its logit
    scale and bias are set so that match probabilities spread over (0, 1)."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = siglip_tokenizer(texts)
    config = SiglipConfig(
        text_config=dict(
            TINY_TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(TINY_TOWER, image_size=image_size, patch_size=8),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():  # initialised at 0 and 0: every probability would be about 0.5
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.0)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return _save(model, processor, out_dir)


def _save(model, processor, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
