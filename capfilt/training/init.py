"""Model and tokenizer initialisation of a training run: a preset, HF BLIP weights, or a
capfilt run."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.training.config import TrainConfig
from capfilt.training.runs import find_checkpoint, load_run


def _init_kind(spec: str) -> str:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if find_checkpoint(path) is not None:
            return "run"
        if (path / "captioner").is_dir() or (path / "filter").is_dir():
            return "export"
    from capfilt.models.blip import resolve_checkpoint

    config_file = resolve_checkpoint(spec).path / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if "BlipForConditionalGeneration" in architectures:
        return "captioner"
    if "BlipForImageTextRetrieval" in architectures:
        return "filter"
    raise CapfiltError(
        f"--init {spec!r} is neither a capfilt run nor a BLIP captioner "
        f"(BlipForConditionalGeneration) or filter (BlipForImageTextRetrieval)"
    )


def _load_blip(spec: str, kind: str):
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.models.blip import check_checkpoint, resolve_checkpoint

    source = resolve_checkpoint(spec)
    check_checkpoint(source, kind)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    model = cls.from_pretrained(str(source.path), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    return model, tokenizer


def ensure_blip_specials(tokenizer, vocab_size: int | None):
    """Add [ENC] (and [DEC]) when a tokenizer lacks them (a released BLIP one, BERT's): at
    BLIP's ids, which must fit `vocab_size` (None: a model built for this tokenizer)."""
    for token in ("[DEC]", "[ENC]"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([token], special_tokens=True)
    worst = max(tokenizer.convert_tokens_to_ids(t) for t in ("[DEC]", "[ENC]"))
    if vocab_size is not None and worst >= vocab_size:
        raise CapfiltError(
            f"the tokenizer's [DEC]/[ENC] ids do not fit the model's vocabulary "
            f"({vocab_size}); pass the checkpoint's own tokenizer"
        )
    return tokenizer


def init_model(config: TrainConfig, texts, accelerator):
    """(MED, tokenizer) from --init (run, export or HF BLIP checkpoints) or a fresh preset, at
    --image-size when given (another size's position embeddings interpolated)."""
    model, tokenizer = _init_model(config, texts, accelerator)
    if config.image_size and config.image_size != model.config.image_size:
        from capfilt.models.med import resize_position_embeddings

        resize_position_embeddings(model, config.image_size)
    return model, tokenizer


def _init_model(config: TrainConfig, texts, accelerator):
    import torch

    from capfilt.models.med import MED, med_config, med_config_from_blip
    from capfilt.models.tokenizers import train_tokenizer

    overrides = {
        k: v
        for k, v in (("queue_size", config.queue_size), ("alpha", config.alpha))
        if v is not None
    }
    sharing = {"sharing": config.sharing} if config.sharing else {}
    torch.manual_seed(config.seed)
    kinds = {spec: _init_kind(spec) for spec in config.init}
    runs = [s for s, k in kinds.items() if k == "run"]
    if runs:
        if len(config.init) > 1:
            raise CapfiltError("--init with a capfilt run takes that run alone")
        model, tokenizer, _ = load_run(runs[0])
        if sharing and config.sharing != model.config.sharing:
            raise CapfiltError(
                f"--init {runs[0]!r} is a run with --sharing {model.config.sharing}, which its "
                f"weights keep; leave --sharing out, or --init from its `capfilt export` folder "
                f"to re-tie them as {config.sharing}"
            )
        if overrides:
            state = model.state_dict()
            model = MED(replace(model.config, **overrides))
            state = {k: v for k, v in state.items() if "queue" not in k}
            model.load_state_dict(state, strict=False)
        return model, tokenizer

    blip = {}
    for spec, kind in kinds.items():
        if kind == "export":
            for sub in ("captioner", "filter"):
                if (Path(spec) / sub).is_dir():
                    blip[sub] = _load_blip(str(Path(spec) / sub), sub)
        else:
            if kind in blip:
                raise CapfiltError(f"--init names two {kind} checkpoints; give one of each kind")
            blip[kind] = _load_blip(spec, kind)
    if blip:
        first = blip.get("filter") or blip.get("captioner")
        tokenizer = first[1]
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
        vocab = first[0].config.text_config.vocab_size
        tokenizer = ensure_blip_specials(tokenizer, vocab)
        # The sharing an export recorded (the filter's, as every other field), else BLIP's.
        model = MED(med_config_from_blip(first[0].config, tokenizer, **overrides, **sharing))
        model.load_blip(
            captioner=blip.get("captioner", (None,))[0], filter=blip.get("filter", (None,))[0]
        )
        return model, tokenizer

    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        # From scratch: a WordPiece of the training texts with the BLIP specials; the main
        # process trains it once, the others read its copy.
        folder = Path(config.out) / "tokenizer"
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                tokenizer = train_tokenizer(texts, config.vocab_size, folder)
            else:
                tokenizer = load_tokenizer(str(folder))
    tokenizer = ensure_blip_specials(tokenizer, None)
    torch.manual_seed(config.seed)
    med = med_config(config.preset, tokenizer, **overrides, **sharing)
    if config.image_size:  # a fresh model is built at the size it trains at
        med = replace(med, vision=dict(med.vision, image_size=config.image_size))
    return MED(med), tokenizer


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise CapfiltError(
            f"cannot load tokenizer {spec!r}: {e}; pass a folder written by "
            "tokenizer.save_pretrained or a BLIP checkpoint folder"
        ) from e


def trainable_parameters(model, task: str):
    """Freeze what the task does not use (DDP requires every trained parameter to be used)."""
    if task == "pretrain":
        used = [
            model.vision_model,
            model.text_encoder,
            model.text_decoder,
            model.vision_proj,
            model.text_proj,
            model.itm_head,
        ]
    elif task == "caption":
        used = [model.vision_model, model.text_decoder]
    else:
        used = [
            model.vision_model,
            model.text_encoder,
            model.vision_proj,
            model.text_proj,
            model.itm_head,
        ]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in used:
        for p in module.parameters():
            p.requires_grad_(True)
    model.temp.requires_grad_(task != "caption")
    # Momentum encoders follow by EMA, never by gradient.
    for p in model.momentum_parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]
