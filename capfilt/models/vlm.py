"""Captioners other than BLIP: BLIP-2 and transformers' image-text-to-text models.

`VlmCaptioner` has the interface the caption stage uses of `blip.Captioner` (image_processor,
device, dtype, source, engine, model_id, generate_captions) over any checkpoint that
`AutoModelForImageTextToText` loads: BLIP-2, LLaVA, Idefics3/SmolVLM, Qwen2-VL, PaliGemma,
Florence-2 and the others of transformers. The checkpoint's own processor resizes the images
(tiles, variable resolution), so the stage hands over the decoded RGB images as they are
(`DecodedImages`), and builds the text: the instruction as a user turn of the processor's chat
template when it has one, else the plain prompt.

Decoding: greedy, beam, or nucleus sampling with one seed per caption that counts only the
caption's own tokens (`CaptionNucleusSampler`), so a caption depends on its seed alone, not on
its batch or the left padding of the batch. `--min-length/--max-length` count new tokens.

Engines: `hf` (transformers' generate) and `vllm` (`pip install 'capfilt[vllm]'`, a GPU).
Checkpoints load from safetensors only and never with remote code.
"""

from __future__ import annotations

import os
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.models.blip import (
    KeyedNucleusSampler,
    ModelSource,
    check_weights,
    checkpoint_config,
    dtype_name,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
)

VLM_ENGINES = ("hf", "vllm")
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
# Default prompts of families that continue a text rather than follow an instruction.
_FAMILY_PROMPTS = {"blip": "a picture of ", "blip-2": "", "paligemma": "caption en"}
# Processors that put the image tokens in front of a plain prompt themselves.
_ADDS_IMAGE_TOKENS = ("blip-2", "paligemma")
VLLM_EXTRA = "pip install 'capfilt[vllm]'"


def default_prompt(model_type: str) -> str:
    """The prompt a family captions with unless --prompt says otherwise."""
    return _FAMILY_PROMPTS.get(model_type, DEFAULT_INSTRUCTION)


def local_model_type(model: str) -> str | None:
    """`model_type` of a checkpoint on this machine (a folder, or in the hub cache), read from
    its config.json without loading or downloading anything; None when it is not here."""
    path = Path(os.path.expanduser(model))
    if not path.is_dir():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:  # a path, not here
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id, no cache: not here
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached).parent
    try:
        return checkpoint_config(ModelSource(model, path, ""), "").get("model_type")
    except (CapfiltError, OSError, ValueError):
        return None


def captioning_class(source: ModelSource, config: dict) -> str:
    """The transformers class that captions with this checkpoint; a one-line refusal of a
    model type that cannot caption (a CLIP, a text-only model ...). Reads config.json only."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = config.get("model_type")
    cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    architectures = config.get("architectures") or []
    generating = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if cls is None and config.get("auto_map"):
        raise CapfiltError(
            f"{source.model_id!r} is a {model_type!r} model that transformers runs only with "
            "the checkpoint's own code, which capfilt never runs; pass a checkpoint of a "
            "family transformers has (e.g. a converted '-hf' repository)"
        )
    if cls is None or (architectures and not generating & set(architectures)):
        what = architectures[0] if architectures else f"{model_type!r} model"
        raise CapfiltError(
            f"{source.model_id!r} is a {what}, which does not generate text from an image; "
            "`capfilt caption` takes a BLIP captioner, BLIP-2 or an image-text-to-text model "
            "of transformers (LLaVA, Idefics3/SmolVLM, Qwen2-VL, PaliGemma, Florence-2, ...)"
        )
    return cls


def check_captioner(source: ModelSource) -> str:
    """Before any weights load: safetensors weights, and a model type that captions.
    Returns the model type."""
    check_weights(source, "captioner")
    config = checkpoint_config(source, "a Hugging Face image-text-to-text checkpoint")
    captioning_class(source, config)
    return config["model_type"]


def require_vllm():
    """vLLM, imported; a one-line error naming the extra when it is not installed."""
    try:
        import vllm
    except ImportError as error:
        raise CapfiltError(
            f"--engine vllm needs vLLM, which is not installed here: {VLLM_EXTRA} "
            "(a CUDA GPU; or use --engine hf)"
        ) from error
    return vllm


class DecodedImages:
    """The stage's "image processor" for these captioners: the decoded RGB PIL images of a
    batch go to the captioner as they are, whose own processor resizes them."""

    def __call__(self, images, return_tensors=None, **kwargs) -> dict:
        return {"pixel_values": list(images)}


# --- decoding: counting the caption's own tokens only -------------------------------------------
class _GeneratedTokens:
    """The tokens generated so far of each row: what `input_ids` holds after its length at the
    first step (the prompt, left padding and image tokens, the same for every row)."""

    start: int | None = None

    def generated(self, input_ids):
        if self.start is None:
            self.start = input_ids.shape[1]
        return input_ids[:, self.start :]


class CaptionNucleusSampler(_GeneratedTokens, KeyedNucleusSampler):
    """BLIP's keyed nucleus draw, the step being the caption's token count: the prompt's
    (padded) length differs between batches, the caption's position does not.

    A row whose `CANDIDATES` most likely tokens hold the top-p mass draws among them (the same
    nucleus as BLIP's sort of the whole vocabulary, a VLM's being 32k-257k tokens); the other
    rows are sorted whole. The choice is each row's own, so a caption stays its seed's alone."""

    CANDIDATES = 64

    def __call__(self, input_ids, scores):
        import torch

        generated = self.generated(input_ids)
        if scores.shape[1] <= self.CANDIDATES:
            return KeyedNucleusSampler.__call__(self, generated, scores)
        probs = scores.float().softmax(dim=-1)  # (B, V)
        top_probs, order = probs.topk(self.CANDIDATES, dim=-1)  # (B, K), descending
        token = self.draw(top_probs, order, generated.shape[1])  # (B, 1)
        chosen = torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
        whole = top_probs.sum(dim=-1) < self.top_p  # (B,) the nucleus reaches past K
        if bool(whole.any()):
            sampler = KeyedNucleusSampler(self.top_p, self.row_seeds[whole.cpu()])
            chosen[whole] = sampler(generated[whole], scores[whole])
        return chosen


class CaptionRepetitionPenalty(_GeneratedTokens):
    """transformers' repetition penalty over the caption's own tokens only: the prompt, the
    image tokens and the batch's padding are not penalised (they would make a caption depend on
    the rows beside it, and a chat template's words would be penalised in every caption)."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids, scores):
        import torch

        generated = self.generated(input_ids)  # (B, t)
        if generated.shape[1] == 0:
            return scores
        score = scores.gather(1, generated)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, generated, score)


# --- the captioner -------------------------------------------------------------------------------
class VlmCaptioner:
    """A BLIP-2 or image-text-to-text checkpoint captioning batches of decoded images."""

    def __init__(self, network, processor, source: ModelSource, device, dtype, model_type: str):
        self.network = network
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = DecodedImages()
        self.source = source
        self.device = device
        self.dtype = dtype
        self.model_type = model_type
        self.engine = "hf"
        self.encoder_decoder = bool(getattr(network.config, "is_encoder_decoder", False))
        if not self.encoder_decoder:
            self.tokenizer.padding_side = "left"  # new tokens follow every row's prompt

    @classmethod
    def load(cls, model: str, precision: str = "auto", device: str = "auto", engine: str = "hf"):
        """Check the checkpoint (safetensors, a captioning model type) and, for `vllm`, that
        vLLM is installed, before any weights load; then load it."""
        if engine not in VLM_ENGINES:
            raise CapfiltError(f"--engine must be hf or vllm for this model, not {engine!r}")
        source = resolve_checkpoint(model)
        return cls.from_source(source, check_captioner(source), precision, device, engine)

    @classmethod
    def from_source(
        cls, source: ModelSource, model_type: str, precision: str, device: str, engine: str
    ):
        """Load a checkpoint `check_captioner` passed, with the engine `engine` (hf or vllm)."""
        if engine == "vllm":
            return VllmCaptioner.load(source, model_type, precision)
        import transformers
        from packaging.version import Version
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        # `torch_dtype` was renamed `dtype` in transformers 4.56.
        dtype_kw = (
            "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        )
        try:
            processor = AutoProcessor.from_pretrained(str(source.path), trust_remote_code=False)
            network = AutoModelForImageTextToText.from_pretrained(
                str(source.path),
                use_safetensors=True,
                trust_remote_code=False,
                **{dtype_kw: dtype},
            )
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CapfiltError(
                f"cannot load {model_type} captioner from {source.path} with transformers "
                f"{transformers.__version__}: {why}"
            ) from e
        network.to(torch_device).eval()
        return cls(network, processor, source, torch_device, dtype, model_type)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def prompt_text(self, prompt: str) -> str:
        """The text of one image's request: `prompt` as a user turn with the image in the
        processor's chat template when it has one, else `prompt` itself (with the image
        token in front where the processor does not add it)."""
        return build_prompt_text(self.processor, self.model_type, prompt)

    def inputs(self, images: list, prompt: str):
        """The processor's tensors of `images` with the prompt, on the device, left-padded."""
        import torch

        text = self.prompt_text(prompt)
        encoded = self.processor(
            images=images, text=[text] * len(images), padding=True, return_tensors="pt"
        )
        moved = {}
        for name, value in encoded.items():
            if name == "labels":  # PaliGemma's processor adds training labels
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[name] = value
        return moved

    def generate_ids(
        self,
        images: list,
        *,
        prompt: str,
        decoding: str = "nucleus",
        num_captions: int = 1,
        top_p: float = 0.9,
        min_length: int = 0,
        max_length: int = 60,
        repetition_penalty: float = 1.0,
        num_beams: int = 3,
        row_seeds=None,
    ):
        """The new token ids (N * num_captions, T) after each prompt; rows grouped by image.

        `min_length`/`max_length` count new tokens. Nucleus decoding needs `row_seeds`, one
        per caption. Its captions are generate's `num_return_sequences` (each model repeats
        its inputs its own way, BLIP-2 after the vision encoder): "sampling" from the one
        token the keyed sampler leaves, whatever warpers the checkpoint's config adds.
        """
        import torch
        from transformers import LogitsProcessorList

        processors = []
        if repetition_penalty != 1.0:
            processors.append(CaptionRepetitionPenalty(repetition_penalty))
        options = dict(
            max_new_tokens=max_length,
            min_new_tokens=min_length,
            do_sample=False,
            repetition_penalty=1.0,  # ours above, over the caption's tokens only
        )
        if self.tokenizer.pad_token_id is not None:
            options["pad_token_id"] = self.tokenizer.pad_token_id
        if decoding == "nucleus":
            if row_seeds is None or len(row_seeds) != len(images) * num_captions:
                raise ValueError("nucleus decoding needs one seed per caption")
            seeds = torch.as_tensor(row_seeds, dtype=torch.long)
            processors.append(CaptionNucleusSampler(top_p, seeds))
            options.update(num_beams=1, do_sample=True, num_return_sequences=num_captions)
            options.update(top_k=0, top_p=1.0, temperature=1.0)  # no warpers to sort again
        elif decoding == "beam":
            options.update(
                num_beams=max(num_beams, num_captions), num_return_sequences=num_captions
            )
        elif decoding == "greedy":
            options.update(num_beams=1)
        else:
            raise ValueError(f"unknown decoding {decoding!r}")
        inputs = self.inputs(images, prompt)
        with torch.inference_mode():
            ids = self.network.generate(
                **inputs, logits_processor=LogitsProcessorList(processors), **options
            )
        if not self.encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1] :]  # the prompt is the same for each row
        if decoding == "greedy" and num_captions > 1:
            ids = ids.repeat_interleave(num_captions, dim=0)
        return ids

    def generate_captions(
        self, images: list, *, prompt: str, num_captions: int = 1, **options
    ) -> list[list[str]]:
        """`num_captions` captions per image (the new text only, stripped): one list per image."""
        ids = self.generate_ids(images, prompt=prompt, num_captions=num_captions, **options)
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return [texts[i : i + num_captions] for i in range(0, len(texts), num_captions)]


def build_prompt_text(processor, model_type: str, prompt: str) -> str:
    """One request's text for `processor` (see `VlmCaptioner.prompt_text`)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}]
        if prompt:
            content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None)
    if model_type in _ADDS_IMAGE_TOKENS or not image_token or image_token in prompt:
        return prompt
    return f"{image_token}\n{prompt}"


# --- vLLM ------------------------------------------------------------------------------------
class VllmCaptioner:
    """The same captions through vLLM (`--engine vllm`, a GPU): one request per caption, each
    with its own seed, so a caption depends on its seed alone as on the hf engine (the tokens
    drawn differ between the engines). Beam search is not offered here.

    Unmeasured in this repository's tests: no machine here has vLLM or a GPU."""

    engine = "vllm"

    def __init__(self, llm, processor, source: ModelSource, device, dtype, model_type: str):
        self.llm = llm
        self.processor = processor
        self.image_processor = DecodedImages()
        self.source = source
        self.device = device
        self.dtype = dtype
        self.model_type = model_type

    @classmethod
    def load(cls, source: ModelSource, model_type: str, precision: str = "auto"):
        vllm = require_vllm()  # before anything loads
        import torch
        from transformers import AutoProcessor

        device = torch.device("cuda")
        dtype = resolve_dtype(precision, device)
        processor = AutoProcessor.from_pretrained(str(source.path), trust_remote_code=False)
        llm = vllm.LLM(
            model=str(source.path),
            trust_remote_code=False,
            dtype=dtype_name(dtype),
            limit_mm_per_prompt={"image": 1},
        )
        return cls(llm, processor, source, device, dtype, model_type)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def generate_captions(
        self,
        images: list,
        *,
        prompt: str,
        num_captions: int = 1,
        row_seeds=None,
        decoding: str = "nucleus",
        top_p: float = 0.9,
        min_length: int = 0,
        max_length: int = 60,
        repetition_penalty: float = 1.0,
        num_beams: int = 3,
    ) -> list[list[str]]:
        from vllm import SamplingParams

        if decoding == "beam":
            raise CapfiltError("--engine vllm: use --decoding nucleus or greedy (or --engine hf)")
        nucleus = decoding == "nucleus"
        text = build_prompt_text(self.processor, self.model_type, prompt)
        requests, params = [], []
        for i, image in enumerate(images):
            for j in range(num_captions if nucleus else 1):
                requests.append({"prompt": text, "multi_modal_data": {"image": image}})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=1.0 if nucleus else 0.0,
                        top_p=top_p if nucleus else 1.0,
                        max_tokens=max_length,
                        min_tokens=min_length,
                        repetition_penalty=repetition_penalty,
                        seed=int(row_seeds[i * num_captions + j]) if nucleus else None,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        texts = [output.outputs[0].text.strip() for output in outputs]
        if not nucleus:
            return [[t] * num_captions for t in texts]
        return [texts[i : i + num_captions] for i in range(0, len(texts), num_captions)]
