"""CLIP and SigLIP image-text similarity: the extra score columns of `capfilt filter`.

`SimilarityScorer` wraps a transformers `CLIPModel` or `SiglipModel`. Its vision encoder runs
once per image (`encode_images`); every caption of that image is then scored against the
kept embedding (`score`), so a web caption and ten synthetic captions cost one image pass.

What each score is:
- clip_score: the cosine similarity of CLIP's projected image and text embeddings, -1 to 1
  (DataComp's "CLIP score"; `logits_per_image / logit_scale.exp()` of the plain model).
- siglip_score: SigLIP's match probability sigmoid(exp(logit_scale) * cosine + logit_bias),
  0 to 1: SigLIP is trained with exactly this per-pair sigmoid, so the probability is the
  score the model means (`sigmoid(logits_per_image)` of the plain model); a raw cosine has
  no calibrated scale across checkpoints.

Text is read in each model's own window, as it was trained: CLIP 77 tokens (padded to the
longest text of a batch, pooled at the end-of-text token), SigLIP 64 tokens padded to 64
(SigLIP pools the last position, so `padding="max_length"` is what it was trained with).
Longer texts are cut to the window; `tokenize_cpu` says which were.

Checkpoints load from safetensors only and never with remote code, like the BLIP ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.models.blip import ModelSource, resolve_checkpoint


@dataclass(frozen=True)
class SimilarityKind:
    """One family of image-text similarity models, as `capfilt filter` names it."""

    name: str  # the option's stem and the score column's: clip → --clip-model, clip_score
    title: str  # for messages
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class loaded
    pad_to_window: bool  # SigLIP was trained on text padded to its whole window
    probability: bool  # the score is sigmoid(scale * cos + bias), not the cosine


KINDS = {
    "clip": SimilarityKind("clip", "CLIP", "clip", "CLIPModel", False, False),
    "siglip": SimilarityKind("siglip", "SigLIP", "siglip", "SiglipModel", True, True),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def column(kind: str) -> str:
    """The scores/ column of a similarity kind: clip_score, siglip_score."""
    return f"{kind}_score"


def check_similarity_checkpoint(source: ModelSource, kind: str) -> None:
    """Refuse, in one line and before any weights load, a folder without safetensors weights
    or holding another kind of model than `kind` asks for."""
    want = KINDS[kind]
    flag = f"--{kind}-model"
    files = [p.name for p in source.path.iterdir() if p.is_file()]
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise CapfiltError(
                f"{flag} {source.model_id!r} holds only pickled weights ({', '.join(pickles)}); "
                "capfilt loads safetensors only, since pickles can run code. Convert it where "
                "you trust the file (save_pretrained(dir, safe_serialization=True)) and pass dir"
            )
        raise CapfiltError(
            f"{flag} {source.model_id!r} has no model weights (no *.safetensors in "
            f"{source.path}); pass a Hugging Face {want.architecture} checkpoint"
        )
    config_file = source.path / "config.json"
    if not config_file.exists():
        raise CapfiltError(
            f"{flag} {source.model_id!r} has no config.json; pass a {want.architecture} checkpoint"
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type == "siglip2":
        raise CapfiltError(
            f"{flag} {source.model_id!r} is a SigLIP 2 model, whose variable-resolution inputs "
            "capfilt does not batch yet; pass a SigLIP (v1) checkpoint such as "
            "google/siglip-base-patch16-224"
        )
    if model_type != want.model_type:
        raise CapfiltError(
            f"{flag} {source.model_id!r} is a {model_type!r} model, not {want.title}; pass a "
            f"{want.architecture} checkpoint"
        )
    architectures = config.get("architectures") or []
    if architectures and want.architecture not in architectures:
        raise CapfiltError(
            f"{flag} {source.model_id!r} is a {architectures[0]} checkpoint; image-text "
            f"similarity needs a {want.architecture} one (both towers and their projections)"
        )
    tokenizer_config = source.path / "tokenizer_config.json"
    if tokenizer_config.exists():
        import importlib.util

        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
        if (
            tokenizer_class == "SiglipTokenizer"
            and importlib.util.find_spec("sentencepiece") is None
        ):
            raise CapfiltError(
                f"{flag} {source.model_id!r}: its tokenizer (SiglipTokenizer) needs the "
                "sentencepiece package: pip install sentencepiece"
            )


EXAMPLES = {"clip": "openai/clip-vit-base-patch32", "siglip": "google/siglip-base-patch16-224"}


def resolve_similarity(kind: str, model: str) -> ModelSource:
    """Find and check a --clip-model/--siglip-model checkpoint without loading it."""
    flag = f"--{kind}-model"
    folder = Path(os.path.expanduser(model))
    if not folder.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise CapfiltError(
            f"{flag} directory {model!r} does not exist; pass a local "
            f"{KINDS[kind].architecture} checkpoint directory or a hub id such as "
            f"{EXAMPLES[kind]}"
        )
    try:
        source = resolve_checkpoint(model)
    except CapfiltError as e:  # not in the hub cache, and no hub
        raise CapfiltError(f"{flag}: {e}") from e
    check_similarity_checkpoint(source, kind)
    return source


class SimilarityScorer:
    """A CLIP or SigLIP model: image embeddings once per image, then one score per pair."""

    def __init__(self, kind: str, network, processor, source: ModelSource, device, dtype):
        self.kind = KINDS[kind]
        self.network = network
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.source = source
        self.device = device
        self.dtype = dtype
        # The window the text tower was trained with (its position table), unless the
        # tokenizer is set to less.
        window = network.config.text_config.max_position_embeddings
        limit = getattr(self.tokenizer, "model_max_length", None)
        self.window = min(window, limit) if isinstance(limit, int) and limit > 0 else window
        self.uses_mask = "attention_mask" in getattr(
            self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]
        )
        self._backend = None  # the Rust tokenizer of `tokenize_cpu`, built on first use

    @classmethod
    def load(cls, kind: str, model: str, precision: str = "auto", device: str = "auto"):
        """Load a checked checkpoint (`resolve_similarity`) onto `device` in `precision`."""
        import transformers
        from packaging.version import Version
        from transformers import AutoProcessor

        from capfilt.models.blip import resolve_device, resolve_dtype

        source = resolve_similarity(kind, model)
        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        network_class = getattr(transformers, KINDS[kind].architecture)
        dtype_kw = (
            "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        )
        try:
            processor = AutoProcessor.from_pretrained(str(source.path), trust_remote_code=False)
            network = network_class.from_pretrained(
                str(source.path), use_safetensors=True, trust_remote_code=False, **{dtype_kw: dtype}
            )
        except (OSError, ValueError, ImportError, TypeError) as e:
            if "sentencepiece" in str(e).lower():  # released SigLIP tokenizers need it
                why = "its tokenizer needs the sentencepiece package: pip install sentencepiece"
            else:
                why = next((line for line in str(e).splitlines() if line.strip()), "")
                why = why.strip() or type(e).__name__
            raise CapfiltError(f"cannot load {KINDS[kind].title} from {source.path}: {why}") from e
        if getattr(processor, "tokenizer", None) is None or processor.image_processor is None:
            raise CapfiltError(
                f"{source.path} has no tokenizer or image processor beside its weights; save "
                f"the {KINDS[kind].title} processor into the checkpoint folder"
            )
        network.to(torch_device).eval()
        return cls(kind, network, processor, source, torch_device, dtype)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def encode_images(self, images):
        """Unit-norm image embeddings (N, E) of a pixel tensor (N, 3, H, W) made by this model's
        image processor, or of a list of PIL images (preprocessed here)."""
        import torch
        from torch.nn.functional import normalize

        if isinstance(images, list):
            from capfilt.images.pixels import preprocess

            images = preprocess(self.image_processor, images)
        with torch.inference_mode():
            pixels = images.to(self.device, self.dtype, non_blocking=True)
            embeds = _pooled(self.network.get_image_features(pixel_values=pixels))  # (N, E)
            return normalize(embeds.float(), dim=-1)

    def tokenize_cpu(self, texts: list[str]):
        """({input_ids, attention_mask} CPU tensors, truncated bool (P,) tensor) of `texts` as
        the model reads them: cut to its window (truncated: a text was cut), padded to the
        longest (CLIP) or to the window (SigLIP). One pass of the tokenizer; safe to call from
        another thread."""
        import numpy as np
        import torch

        if self._backend is None:
            self._backend = _window_backend(self.tokenizer, self.window, self.kind.pad_to_window)
            self._backend = self._backend or False
        if self._backend is False:
            return self._tokenize_slow(texts)
        encodings = self._backend.encode_batch_fast(texts)
        tokens = {"input_ids": torch.from_numpy(np.array([e.ids for e in encodings], np.int64))}
        if self.uses_mask:
            mask = np.array([e.attention_mask for e in encodings], np.int64)
            tokens["attention_mask"] = torch.from_numpy(mask)
        truncated = torch.tensor([bool(e.overflowing) for e in encodings], dtype=torch.bool)
        return tokens, truncated

    def _tokenize_slow(self, texts: list[str]):
        """`tokenize_cpu` for a tokenizer without a Rust backend: the tokenizer's own call, and
        the untruncated lengths from a second pass."""
        import torch

        encoded = self.tokenizer(
            texts,
            padding="max_length" if self.kind.pad_to_window else "longest",
            truncation=True,
            max_length=self.window,
            return_tensors="pt",
        )
        tokens = {"input_ids": encoded["input_ids"]}
        if self.uses_mask and "attention_mask" in encoded:
            tokens["attention_mask"] = encoded["attention_mask"]
        full = self.tokenizer(texts)["input_ids"]
        truncated = torch.tensor([len(ids) > self.window for ids in full], dtype=torch.bool)
        return tokens, truncated

    def score(self, images, image_index, texts: list[str], tokens=None):
        """Scores (P,) float32 CPU of pairs (images[image_index[i]], texts[i]): the cosine
        (CLIP) or the match probability (SigLIP). `images`: `encode_images`' output;
        `tokens`: `tokenize_cpu(texts)[0]` when already done."""
        import torch
        from torch.nn.functional import normalize

        with torch.inference_mode():
            if tokens is None:
                tokens = self.tokenize_cpu(texts)[0]
            inputs = {name: t.to(self.device) for name, t in tokens.items()}  # (P, T)
            text = normalize(_pooled(self.network.get_text_features(**inputs)).float(), dim=-1)
            index = torch.as_tensor(image_index, dtype=torch.long, device=self.device)
            cosine = (images.index_select(0, index) * text).sum(dim=-1)  # (P,)
            if not self.kind.probability:
                return cosine.cpu()
            scale = self.network.logit_scale.float().exp()
            bias = self.network.logit_bias.float()
            return torch.sigmoid(cosine * scale + bias).cpu()


def _pooled(output):
    """The embedding tensor of `get_*_features`: a tensor (transformers 4) or an output whose
    pooler_output holds it (transformers 5)."""
    return getattr(output, "pooler_output", output)


def _window_backend(tokenizer, window: int, pad_to_window: bool):
    """A copy of a fast tokenizer's Rust tokenizer that truncates to `window` and pads as the
    model was trained (to the longest, or to `window`), on the tokenizer's sides: the ids and
    mask of `tokenizer(texts, padding=..., truncation=True, max_length=window)`, and each
    encoding's overflow tells whether it was cut. None when the tokenizer has no Rust backend
    or no pad token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if tokenizer.pad_token_id is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())  # the shared one keeps its own settings
    copy.enable_truncation(window, direction=tokenizer.truncation_side)
    copy.enable_padding(
        direction=tokenizer.padding_side,
        pad_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        length=window if pad_to_window else None,
    )
    return copy
