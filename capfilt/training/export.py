"""`capfilt export`: a MED run as two Hugging Face BLIP checkpoints.

    DIR/captioner/   BlipForConditionalGeneration + BlipProcessor (what `capfilt caption` loads)
    DIR/filter/      BlipForImageTextRetrieval + BlipProcessor   (what `capfilt filter` loads)

Weights are safetensors; plain `transformers` loads either folder with `from_pretrained`.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from capfilt.core.errors import CapfiltError

KINDS = ("captioner", "filter")


def write_blip(
    model,
    tokenizer,
    out_dir: str | Path,
    kinds: tuple[str, ...] = KINDS,
    image_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Save `model` (MED) as HF BLIP checkpoints under out_dir/<kind>; each folder appears whole."""
    from transformers import BlipProcessor

    from capfilt.models.tiny import image_processor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = image_size or model.config.image_size
    written = {}
    for kind in kinds:
        target = out_dir / kind
        if target.exists() and not overwrite:
            raise CapfiltError(f"{target} exists; pass --overwrite to replace it")
        tmp = out_dir / f".{kind}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            model.to_blip(kind).save_pretrained(str(tmp), safe_serialization=True)
            BlipProcessor(
                image_processor=image_processor(size), tokenizer=tokenizer
            ).save_pretrained(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        written[kind] = target
    return written


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    kinds: tuple[str, ...] = KINDS,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export the newest checkpoint of a capfilt run folder; returns {kind: folder}."""
    from capfilt.training.runs import load_run

    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise CapfiltError(f"unknown export kind(s) {sorted(unknown)}; choose from {KINDS}")
    model, tokenizer, _ = load_run(run_dir)
    return write_blip(model, tokenizer, out_dir, kinds, overwrite=overwrite)
