"""Hugging Face BLIP checkpoints for CapFilt: loading, precision, device, and the model math.

`Captioner` wraps a `BlipForConditionalGeneration` and `ItmScorer` a
`BlipForImageTextRetrieval`. Both call the BLIP submodules themselves so that the vision
encoder runs once per image: the captioner shares its image embeddings between all sampled
captions, the scorer between the web caption and every synthetic caption.

Two engines compute the same thing: `fast` (the default; `capfilt.models.fast`: SDPA
attention, each image's cross-attention keys/values computed once for all its captions, a
static decoding cache without per-token host syncs) and `hf` (the transformers modules as they
are; the reference the parity tests hold `fast` to). Beam search always runs on `hf`.

Checkpoints load from safetensors only (pickled `.bin` weights can run code) and never with
remote code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.models.sampling import uniform_hash

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_FILTER = "Salesforce/blip-itm-large-coco"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ITM_TOKENS = ("auto", "enc", "cls")
ENGINES = ("fast", "hf")
# Sampling on the fast engine keeps the top 50 tokens before the nucleus, as BLIP's released
# code did through `generate`'s default top_k.
FAST_TOP_K = 50


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise CapfiltError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    return engine


_ARCHITECTURES = {
    "captioner": "BlipForConditionalGeneration",
    "filter": "BlipForImageTextRetrieval",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a checkpoint needs (a VLM's chat template included); anything else in a hub
# repository (pickles, TF/Flax weights, remote code) is never downloaded.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint came from: the id the user gave, the local folder and its revision."""

    model_id: str
    path: Path
    revision: str  # the commit hash when from the hub cache, else the local path


# --- resolving a checkpoint ------------------------------------------------------------------
def resolve_checkpoint(model: str, revision: str | None = None) -> ModelSource:
    """Find `model` (a local directory or a hub id) on disk, downloading it when allowed."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        path = path.resolve()
        return ModelSource(model, path, _snapshot_revision(path) or content_revision(path))
    if _looks_like_path(model):
        raise CapfiltError(
            f"model directory {model!r} does not exist; pass a Hugging Face BLIP checkpoint "
            "directory or a hub id such as Salesforce/blip-image-captioning-large"
        )
    folder = _hub_snapshot(model, revision)
    return ModelSource(model, folder, _snapshot_revision(folder) or revision or "unknown")


def local_revision(model: str) -> str | None:
    """The revision of `model` if it is on this machine (a folder, or in the hub cache), without
    downloading anything; None when it is not here."""
    if Path(os.path.expanduser(model)).is_dir():
        return resolve_checkpoint(model).revision
    if _looks_like_path(model):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache
        return None
    return _snapshot_revision(Path(folder))


def model_name(model: str) -> str:
    """`model` as recorded: a local folder as its absolute path, a hub id as given."""
    path = Path(os.path.expanduser(model))
    return str(path.resolve()) if path.is_dir() else model


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1


def content_revision(path: Path) -> str:
    """A revision for a local checkpoint folder: a hash of every file in it (weights, config,
    tokenizer), so that other weights under the same path are another revision. Hashed once
    per process while no file is replaced or changes size or time."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    stats = [(f.name, f.stat()) for f in files]
    key = (
        str(path),
        tuple((n, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats),
    )
    if key not in _CONTENT_REVISIONS:
        _CONTENT_REVISIONS[key] = _hash_files(files)
    return _CONTENT_REVISIONS[key]


_CONTENT_REVISIONS: dict = {}  # (folder, its files' names, inodes, sizes, times) → revision


def _hash_files(files: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _snapshot_revision(path: Path) -> str | None:
    """The commit hash of a hub-cache snapshot folder (…/snapshots/<commit>), else None."""
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    return None


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        # The cache first: it answers at once and works offline.
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not cached (or partially); try the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
        except Exception as e:  # noqa: BLE001 - every hub failure gets the same advice
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    raise CapfiltError(
        f"cannot load model {repo_id!r}: it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and the hub cannot be reached ({why}). Pass a local "
        "checkpoint directory with --model /path/to/checkpoint, or set HF_HOME to a cache that "
        f"holds it (`huggingface-cli download {repo_id}` on a machine with network)."
    )


def check_checkpoint(source: ModelSource, kind: str) -> None:
    """Refuse folders without safetensors weights, or with the wrong BLIP head for `kind`."""
    check_weights(source, kind)
    _check_blip(source, kind, checkpoint_config(source, "a BLIP checkpoint"))


def check_weights(source: ModelSource, kind: str) -> None:
    """Refuse a folder without safetensors weights (pickles only, a training run, nothing)."""
    files = [p.name for p in source.path.iterdir() if p.is_file()]
    has_safetensors = any(
        f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files
    )
    if not has_safetensors:
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise CapfiltError(
                f"{source.model_id!r} holds only pickled weights ({', '.join(pickles)}); capfilt "
                "loads safetensors only, since pickles can run code. Convert it where you trust "
                "the file: load it with transformers and call "
                "save_pretrained(dir, safe_serialization=True), then pass that dir to --model"
            )
        if any(re.match(r"^step-\d+$", p.name) for p in source.path.iterdir() if p.is_dir()):
            raise CapfiltError(
                f"{source.model_id!r} is a capfilt training run, not a model checkpoint; turn "
                f"it into BLIP checkpoints first: `capfilt export {source.path} --out DIR`, "
                f"then pass DIR/{kind} to --model"
            )
        raise CapfiltError(
            f"{source.model_id!r} has no model weights (no *.safetensors in {source.path}); "
            "pass a Hugging Face BLIP checkpoint directory"
        )


def checkpoint_config(source: ModelSource, expected: str) -> dict:
    """The checkpoint's config.json as a dict (nothing loaded); `expected` names what to pass
    instead when there is none."""
    config_file = source.path / "config.json"
    if not config_file.exists():
        raise CapfiltError(f"{source.model_id!r} has no config.json; pass {expected}")
    return json.loads(config_file.read_text())


def _check_blip(source: ModelSource, kind: str, config: dict) -> None:
    if config.get("model_type") != "blip":
        raise CapfiltError(
            f"{source.model_id!r} is a {config.get('model_type')!r} model, not BLIP; "
            f"pass a BLIP {kind} checkpoint"
        )
    expected = _ARCHITECTURES[kind]
    architectures = config.get("architectures") or []
    if architectures and expected not in architectures:
        command, default = {
            "captioner": ("caption", DEFAULT_CAPTIONER),
            "filter": ("filter", DEFAULT_FILTER),
        }[kind]
        raise CapfiltError(
            f"{source.model_id!r} is a {architectures[0]} checkpoint, but `capfilt {command}` "
            f"needs a {expected} one (default {default})"
        )


# --- device and precision --------------------------------------------------------------------
def resolve_device(device: str = "auto"):
    """`auto`: this process's accelerator under `accelerate launch`, else cuda, mps or cpu."""
    import torch

    if device != "auto":
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise CapfiltError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise CapfiltError(f"device {device!r} asked for, but CUDA is not available here")
        return resolved
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(precision: str, device):
    """`auto`: bf16 on a GPU, fp32 on the CPU."""
    import torch

    if precision not in PRECISIONS:
        raise CapfiltError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise CapfiltError("fp16 is not supported on the CPU; use --precision fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_record(model, model_id: str) -> dict:
    """Model id, revision, device and dtype for the manifest (revision None if not loaded)."""
    if model is None:
        return dict(id=model_id, revision=None)
    return dict(
        id=model.source.model_id,
        revision=model.source.revision,
        path=str(model.source.path),
        device=str(model.device),
        dtype=dtype_name(model.dtype),
        engine=model.engine,
    )


def _load(kind: str, model: str, precision: str, device: str):
    import transformers
    from packaging.version import Version
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    source = resolve_checkpoint(model)
    check_checkpoint(source, kind)
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    cls = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}[kind]
    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        processor = BlipProcessor.from_pretrained(str(source.path))
        network = cls.from_pretrained(
            str(source.path), use_safetensors=True, trust_remote_code=False, **{dtype_kw: dtype}
        )
    except (OSError, ValueError) as e:
        raise CapfiltError(f"cannot load BLIP {kind} from {source.path}: {e}") from e
    network.to(torch_device).eval()
    return network, processor, source, torch_device, dtype


# --- captioning ------------------------------------------------------------------------------
class KeyedNucleusSampler:
    """Logits processor that draws each row's next token from its top-p nucleus.

    The randomness is a counter-based hash of (row seed, position), not a shared generator,
    so a caption depends on its own seed only: the same seed gives the same caption whatever
    the batch size, the order of images, or the number of processes. Used with greedy search,
    which then picks the drawn token (all other logits are -inf).
    """

    def __init__(self, top_p: float, row_seeds):
        self.top_p = top_p
        self.row_seeds = row_seeds  # (B,) int64 in [0, 2**32)

    def __call__(self, input_ids, scores):
        import torch

        probs = scores.float().softmax(dim=-1)  # (B, V)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        token = self.draw(sorted_probs, order, input_ids.shape[1])  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    def draw(self, sorted_probs, order, step: int):
        """The token (B, 1) each row draws at `step` from its nucleus: `sorted_probs` (B, K)
        descending, `order` their token ids (the whole vocabulary or its K likeliest)."""
        import torch

        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
        nucleus = before < self.top_p
        nucleus[:, 0] = True
        cumulative = (sorted_probs * nucleus).cumsum(dim=-1)  # (B, K)
        u = uniform_hash(self.row_seeds.to(sorted_probs.device), step)  # (B,)
        target = (u * cumulative[:, -1]).unsqueeze(1)
        index = torch.searchsorted(cumulative, target, right=True)
        index = torch.minimum(index, nucleus.sum(dim=1, keepdim=True) - 1)  # float rounding
        return order.gather(1, index)  # (B, 1)


class Captioner:
    """A BLIP captioner: image embeddings once per image, then batched decoding from a prompt."""

    def __init__(
        self,
        network,
        processor,
        source: ModelSource,
        device,
        dtype,
        engine: str = "fast",
        fast_options: dict | None = None,
    ):
        self.network = network
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.source = source
        self.device = device
        self.dtype = dtype
        self.engine = check_engine(engine)
        self.fast_options = fast_options or {}
        self._fast = None

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_CAPTIONER,
        precision: str = "auto",
        device: str = "auto",
        engine: str = "fast",
        fast_options: dict | None = None,
    ):
        return cls(*_load("captioner", model, precision, device), engine, fast_options)

    def fast(self):
        """The fast-path decoder over this network's weights (built once)."""
        if self._fast is None:
            from capfilt.models.fast import FastCaptioner

            self._fast = FastCaptioner(self.network, **self.fast_options)
        return self._fast

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def prompt_ids(self, prompt: str):
        """(1, P) decoder input: [DEC] then the prompt's tokens, without the closing [SEP]."""
        import torch

        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        bos = self.network.config.text_config.bos_token_id
        ids = [bos, *ids[1:-1]]  # [CLS] → [DEC], drop [SEP], as BLIP does
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def encode_images(self, pixel_values):
        """(N, 3, H, W) → image embeddings (N, L, D)."""
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        return self.network.vision_model(pixel_values=pixel_values).last_hidden_state

    def generate_ids(
        self,
        pixel_values,
        *,
        prompt: str,
        decoding: str = "nucleus",
        num_captions: int = 1,
        top_p: float = 0.9,
        min_length: int = 5,
        max_length: int = 20,
        repetition_penalty: float = 1.0,
        num_beams: int = 3,
        row_seeds=None,
    ):
        """Token ids (N * num_captions, T) starting with the prompt; rows grouped by image.

        `min_length`/`max_length` count the prompt's tokens, as in BLIP and
        `BlipForConditionalGeneration.generate`. Nucleus decoding needs `row_seeds`
        (N * num_captions,), one per caption.
        """
        import torch
        from transformers import LogitsProcessorList

        if self.engine == "fast" and decoding != "beam":
            return self._fast_generate_ids(
                pixel_values,
                prompt=prompt,
                decoding=decoding,
                num_captions=num_captions,
                top_p=top_p,
                min_length=min_length,
                max_length=max_length,
                repetition_penalty=repetition_penalty,
                row_seeds=row_seeds,
            )
        with torch.inference_mode():
            image_embeds = self.encode_images(pixel_values)  # (N, L, D)
            n_images = image_embeds.shape[0]
            options = dict(
                max_length=max_length,
                min_length=min_length,
                repetition_penalty=repetition_penalty,
                eos_token_id=self.network.config.text_config.sep_token_id,
                pad_token_id=self.network.config.text_config.pad_token_id,
                do_sample=False,
            )
            if decoding == "nucleus":
                image_embeds = image_embeds.repeat_interleave(num_captions, dim=0)
                if row_seeds is None or len(row_seeds) != image_embeds.shape[0]:
                    raise ValueError("nucleus decoding needs one seed per caption")
                options.update(
                    num_beams=1,
                    logits_processor=LogitsProcessorList(
                        [KeyedNucleusSampler(top_p, torch.as_tensor(row_seeds, dtype=torch.long))]
                    ),
                )
            elif decoding == "beam":
                options.update(
                    num_beams=max(num_beams, num_captions), num_return_sequences=num_captions
                )
            elif decoding == "greedy":
                options.update(num_beams=1)
            else:
                raise ValueError(f"unknown decoding {decoding!r}")
            batch = image_embeds.shape[0]
            input_ids = self.prompt_ids(prompt).expand(batch, -1).contiguous()
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            ids = self.network.text_decoder.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                **options,
            )
        if decoding == "greedy" and num_captions > 1:
            ids = ids.repeat_interleave(num_captions, dim=0)
        assert ids.shape[0] == n_images * num_captions
        return ids

    def _fast_generate_ids(
        self,
        pixel_values,
        *,
        prompt,
        decoding,
        num_captions,
        top_p,
        min_length,
        max_length,
        repetition_penalty,
        row_seeds,
    ):
        import torch

        nucleus = decoding == "nucleus"
        if nucleus and (row_seeds is None or len(row_seeds) != len(pixel_values) * num_captions):
            raise ValueError("nucleus decoding needs one seed per caption")
        with torch.inference_mode():
            ids = self.fast().generate(
                pixel_values.to(self.device, self.dtype, non_blocking=True),
                num_captions=num_captions if nucleus else 1,
                prompt_ids=self.prompt_ids(prompt)[0],
                max_length=max_length,
                min_length=min_length,
                repetition_penalty=repetition_penalty,
                do_sample=nucleus,
                top_p=top_p,
                top_k=FAST_TOP_K,
                # one seed per caption: the same captions at any batch size
                seeds=torch.as_tensor(row_seeds, dtype=torch.long) if nucleus else None,
            )
        if decoding == "greedy" and num_captions > 1:
            ids = ids.repeat_interleave(num_captions, dim=0)
        return ids

    def generate_captions(
        self, pixel_values, *, prompt: str, num_captions: int = 1, **options
    ) -> list[list[str]]:
        """`num_captions` captions per image, the prompt stripped: one list per image.

        As BLIP does: the whole sequence is decoded and the prompt's characters cut off. When
        the first new token continues the prompt's last word ("of" + "##s"), decoding only the
        new tokens would give "##s red circle"; BLIP's cut gives "red circle".
        """
        ids = self.generate_ids(pixel_values, prompt=prompt, num_captions=num_captions, **options)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        texts = [t[len(prompt) :].strip() for t in texts]
        return [texts[i : i + num_captions] for i in range(0, len(texts), num_captions)]


# --- image-text matching ---------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """What the scorer keeps of each image: the ViT tokens for ITM and the projected CLS for ITC."""

    embeds: object  # (N, L, D)
    itc: object  # (N, E), unit norm


class ItmScorer:
    """A BLIP filter: ITM match probability and ITC cosine similarity of image-text pairs."""

    def __init__(
        self,
        network,
        processor,
        source: ModelSource,
        device,
        dtype,
        itm_token: str = "auto",
        max_text_tokens: int = 35,
        engine: str = "fast",
    ):
        self.engine = check_engine(engine)
        self._fast = None
        if itm_token not in ITM_TOKENS:
            raise CapfiltError(f"unknown --itm-token {itm_token!r}; use auto, enc or cls")
        self.network = network
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.source = source
        self.device = device
        self.dtype = dtype
        max_positions = network.config.text_config.max_position_embeddings
        self.max_text_tokens = min(max_text_tokens, max_positions)
        enc_id = self.tokenizer.convert_tokens_to_ids("[ENC]")
        has_enc = enc_id is not None and enc_id != self.tokenizer.unk_token_id
        if itm_token == "enc" and not has_enc:
            raise CapfiltError(
                f"--itm-token enc: the tokenizer of {source.model_id!r} has no [ENC] token; "
                "use --itm-token cls (or auto)"
            )
        if itm_token == "auto":
            itm_token = "enc" if has_enc else "cls"
        self.itm_token = itm_token
        # BLIP trained ITM with [ENC] in the first position; the released code feeds [CLS].
        self.itm_token_id = enc_id if itm_token == "enc" else None
        self._backend = None  # the tokenizers.Tokenizer of `tokenize_cpu`, built on first use

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_FILTER,
        precision: str = "auto",
        device: str = "auto",
        itm_token: str = "auto",
        max_text_tokens: int = 35,
        engine: str = "fast",
    ):
        network, processor, source, torch_device, dtype = _load("filter", model, precision, device)
        return cls(
            network, processor, source, torch_device, dtype, itm_token, max_text_tokens, engine
        )

    def fast(self):
        """The fast-path scorer over this network's weights (built once)."""
        if self._fast is None:
            from capfilt.models.fast import FastItm

            self._fast = FastItm(self.network)
        return self._fast

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def encode_images(self, pixel_values) -> ImageFeatures:
        """Run the vision encoder once for a batch of images (N, 3, H, W)."""
        import torch
        from torch.nn.functional import normalize

        with torch.inference_mode():
            pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
            if self.engine == "fast":
                embeds = self.fast().encode_images(pixel_values)
                return ImageFeatures(embeds, self.fast().image_features(embeds))
            embeds = self.network.vision_model(pixel_values=pixel_values).last_hidden_state
            itc = normalize(self.network.vision_proj(embeds[:, 0, :]), dim=-1)
        return ImageFeatures(embeds, itc)

    def tokenize(self, texts: list[str]):
        """(input_ids, attention_mask) of `texts` on the model's device, padded to the longest."""
        input_ids, attention_mask = self.tokenize_cpu(texts)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def tokenize_cpu(self, texts: list[str]):
        """The CPU tensors of `tokenize`; safe to call from another thread (to run ahead)."""
        input_ids, attention_mask, _ = self.tokenize_marking_truncation(texts)
        return input_ids, attention_mask

    def tokenize_marking_truncation(self, texts: list[str]):
        """`tokenize_cpu`'s (input_ids, attention_mask), and a bool (P,) tensor: True where a
        text was cut to --max-text-tokens. One tokenizer pass (the Rust encodings say what
        overflowed); a tokenizer without a Rust backend is called twice."""
        import torch

        if self._backend is None:
            self._backend = _padding_backend(self.tokenizer, self.max_text_tokens) or False
        if self._backend is False:
            encoded = self.tokenizer(
                texts,
                padding="longest",
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
            truncated = torch.tensor([n > self.max_text_tokens for n in lengths], dtype=torch.bool)
            return encoded.input_ids, encoded.attention_mask, truncated
        import numpy as np

        encodings = self._backend.encode_batch_fast(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (P, T)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        truncated = torch.tensor([bool(e.overflowing) for e in encodings], dtype=torch.bool)
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), truncated

    def score(self, images: ImageFeatures, image_index, texts: list[str], tokens=None):
        """ITM probability and ITC similarity of pairs (images[image_index[i]], texts[i]).

        `tokens`: `tokenize_cpu(texts)` when already done (ahead, in another thread).
        Returns two float32 CPU tensors of shape (P,).
        """
        import torch
        from torch.nn.functional import normalize

        with torch.inference_mode():
            index = torch.as_tensor(image_index, dtype=torch.long, device=self.device)
            if tokens is None:
                tokens = self.tokenize_cpu(texts)
            input_ids, attention_mask = (t.to(self.device) for t in tokens)  # (P, T)
            itm_ids = input_ids
            if self.itm_token_id is not None:
                itm_ids = input_ids.clone()
                itm_ids[:, 0] = self.itm_token_id
            if self.engine == "fast":
                # each image's keys/values serve all of its captions
                itm = self.fast().itm(images.embeds, index, itm_ids, attention_mask)
                text_feat = self.fast().text_features(input_ids, attention_mask)  # (P, E)
                itc = (images.itc.index_select(0, index) * text_feat).float().sum(dim=-1)
                return itm.float().cpu(), itc.cpu()
            pair_embeds = images.embeds.index_select(0, index)  # (P, L, D)
            image_mask = torch.ones(pair_embeds.shape[:-1], dtype=torch.long, device=self.device)
            fused = self.network.text_encoder(
                input_ids=itm_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=pair_embeds,
                encoder_attention_mask=image_mask,
            ).last_hidden_state  # (P, T, H)
            itm = self.network.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]
            # ITC reads the unimodal text encoder: the same weights without the image.
            text = self.network.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            text_feat = normalize(self.network.text_proj(text[:, 0, :]), dim=-1)  # (P, E)
            itc = (images.itc.index_select(0, index) * text_feat).float().sum(dim=-1)
        return itm.cpu(), itc.cpu()


def _padding_backend(tokenizer, max_length: int):
    """A copy of a fast tokenizer's Rust tokenizer that truncates and pads as `tokenize` asks.

    Calling it directly gives the same ids and mask as `tokenizer(texts, padding="longest",
    truncation=True, max_length=...)` without transformers' per-text Python conversion, which
    costs as much as the tokenizing. None when the tokenizer is not a plain right-padding,
    right-truncating fast one (then `tokenize_cpu` calls the tokenizer itself).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or not hasattr(backend, "encode_batch_fast")
        or tokenizer.padding_side != "right"
        or tokenizer.truncation_side != "right"
        or tokenizer.pad_token_id is None
    ):
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())  # the shared one keeps its own settings
    copy.enable_truncation(max_length)
    copy.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return copy
