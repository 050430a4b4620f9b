"""WordPiece tokenizers with BLIP's specials ([DEC], [ENC]), trained on the fly."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# BLIP's specials: [DEC] starts generation (the decoder's BOS), [ENC] replaces [CLS] as the
# first token of image-grounded encoding in BLIP's training.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, out_dir: str | Path | None = None
):
    """A lower-cased WordPiece tokenizer with the BLIP specials, the same for the same texts
    (saved when `out_dir`).

    Its vocabulary: the specials, every character seen (alone and as a `##` continuation, so
    that any word splits into known pieces), then the most frequent words (ties in alphabetical
    order) up to `vocab_size`. The `tokenizers` trainer is not used: it breaks ties between
    equally frequent merges in hash order, so the same texts gave another vocabulary in every
    process.
    """
    tok = wordpiece_tokenizer(texts, SPECIAL_TOKENS, "[UNK]", vocab_size)
    tokenizer = as_blip_tokenizer(tok)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def wordpiece_tokenizer(texts: Iterable[str], specials: list[str], unk_token: str, vocab_size: int):
    """A BERT-style (lower-cased) `tokenizers.Tokenizer` whose WordPiece vocabulary is
    `specials`, every character seen (alone and as a `##` continuation) and the most frequent
    words (ties in alphabetical order) up to `vocab_size`: the same for the same texts."""
    from collections import Counter

    from tokenizers import Tokenizer, models

    splitter = bert_pipeline(Tokenizer(models.WordPiece({unk_token: 0}, unk_token=unk_token)))
    words: Counter = Counter()
    for text in texts:
        normalized = splitter.normalizer.normalize_str(text)
        words.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
    characters = sorted({ch for word in words for ch in word})
    vocab: dict[str, int] = {}
    for token in [*specials, *characters, *(f"##{ch}" for ch in characters)]:
        vocab.setdefault(token, len(vocab))
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    return bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token=unk_token)))


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
