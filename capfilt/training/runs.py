"""A run folder: checkpoints step-N/ (complete once metadata.json exists), the log, and
loading a run back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from capfilt.core.errors import CapfiltError

CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


METADATA = "metadata.json"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints whose metadata.json exists, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        m = CHECKPOINT_DIR.match(entry.name)
        if m and (entry / METADATA).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(Path(run_dir))
    return found[-1][1] if found else None


def read_metadata(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / METADATA).read_text())


def write_json_atomic(path: Path, data: dict) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _write_text_atomic(path: Path, text: str) -> None:
    """Readers (and a resumed run) see the old file or the new one, never a part."""
    import fsspec

    from capfilt.core.parquet import write_bytes_atomic

    write_bytes_atomic(fsspec.filesystem("file"), str(path), text.encode())


def save_checkpoint(accelerator, run_dir: Path, step: int, metadata: dict, keep_last: int) -> Path:
    """accelerator.save_state into RUN/step-N, then metadata.json, then prune old checkpoints."""
    folder = run_dir / f"step-{step}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a killed run
    accelerator.wait_for_everyone()
    # The decoder shares most of its tensors with the encoder by design; accelerate stores each
    # once and warns about every shared name, which would bury the progress output.
    import logging

    accelerate_logger = logging.getLogger("accelerate.utils.other")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(folder))
    finally:
        accelerate_logger.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(folder / METADATA, metadata)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            # Metadata first: a kill half-way through the removal must not leave a folder
            # that still counts as a complete checkpoint.
            (old / METADATA).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        for entry in run_dir.iterdir():  # incomplete folders of earlier steps never resume
            m = CHECKPOINT_DIR.match(entry.name)
            if m and int(m.group(1)) < step and not (entry / METADATA).exists():
                shutil.rmtree(entry, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint `path` names: itself (a step-N folder) or a run's newest; else None."""
    if not path.is_dir():
        return None
    return path if (path / METADATA).is_file() else latest_checkpoint(path)


def load_run(run_dir: str | Path):
    """(MED model, tokenizer, metadata) of the newest checkpoint of a capfilt run folder."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from capfilt.models.med import MED, MEDConfig

    run_dir = Path(run_dir)
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise CapfiltError(
            f"{str(run_dir)!r} has no complete checkpoint (step-N/{METADATA}); "
            "pass a folder written by `capfilt pretrain` or `capfilt finetune`"
        )
    metadata = read_metadata(checkpoint)
    model = MED(MEDConfig.from_dict(metadata["model_config"]))
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.parent / "tokenizer"))
    return model.eval(), tokenizer, metadata


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (a killed run logged them)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record["step"] <= step:
            kept.append(line)
    # a kill while truncating must not lose the kept lines
    _write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-step records of a run's log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
