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
