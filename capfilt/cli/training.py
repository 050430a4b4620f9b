"""The training commands: pretrain, finetune, export, evaluate."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.app import DatasetArg, command, console


# --- pretrain, finetune, export, run (capfilt/train.py, capfilt/pipeline.py) -----------------
class Preset(str, Enum):
    tiny = "tiny"
    base = "base"
    large = "large"


class Source(str, Enum):
    all = "all"
    web = "web"
    synthetic = "synthetic"


class FinetuneTask(str, Enum):
    caption = "caption"
    itm = "itm"


RunOut = Annotated[str, typer.Option("--out", help="Run folder: checkpoints step-N/, log.jsonl.")]
InitOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Start from HF BLIP weights (captioner and/or ITM model: hub id or local "
        "dir, safetensors only; repeat for both) or a capfilt run/export folder."
    ),
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help="Tokenizer folder; default: --init's, else a WordPiece trained on the training texts."
    ),
]
SourceOpt = Annotated[Source, typer.Option(help="Train on web texts, synthetic ones, or all.")]
BatchOpt = Annotated[int, typer.Option(help="Pairs per batch per process.")]
AccumOpt = Annotated[int, typer.Option(help="Gradient accumulation steps.")]
EpochsOpt = Annotated[int, typer.Option(help="Epochs (ignored with --max-steps).")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps (at most 10% of the run).")]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW weight decay.")]
QueueOpt = Annotated[int | None, typer.Option(help="ITC feature queue size (BLIP: 57600).")]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")
]
FlipOpt = Annotated[
    bool, typer.Option(help="Random horizontal flips (turn off when captions say left/right).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")]
SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.")]
KeepOpt = Annotated[int, typer.Option(help="Keep the last K checkpoints.")]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes for JPEG decoding.")]
OverwriteRunOpt = Annotated[bool, typer.Option(help="Start again instead of resuming --out.")]


def _train_summary(result) -> None:
    if not result.is_main_process:
        return
    out = console()
    losses = "  ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    out.print(
        f"[bold green]✓[/] {result.step}/{result.total_steps} steps{resumed} on "
        f"{result.examples} pairs; {losses}; {result.images_per_second:.1f} images/s"
    )
    if result.skipped:
        out.print("skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    if result.checkpoint:
        out.print(f"checkpoint: {result.checkpoint}")


CompileOpt = Annotated[
    bool,
    typer.Option(help="torch.compile each transformer layer (GPU; the first steps compile)."),
]


@command()
def pretrain(
    datasets: Annotated[list[str], typer.Argument(help="Dataset folders (curated/ or images/).")],
    out: RunOut,
    preset: Annotated[Preset, typer.Option(help="Model size when not --init.")] = Preset.base,
    init: InitOpt = None,
    tokenizer: TokenizerOpt = None,
    source: SourceOpt = Source.all,
    batch_size: BatchOpt = 32,
    grad_accum: AccumOpt = 1,
    epochs: EpochsOpt = 20,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    warmup_steps: WarmupOpt = 3000,
    weight_decay: WeightDecayOpt = 0.05,
    queue_size: QueueOpt = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    flip: FlipOpt = True,
    seed: SeedOpt = 42,
    save_every: SaveEveryOpt = 1000,
    keep_last: KeepOpt = 2,
    num_workers: WorkersOpt = 4,
    overwrite: OverwriteRunOpt = False,
):
    """Pretrain BLIP's MED model (ITC + ITM + LM) on one or more datasets through Accelerate.

    Reads each dataset's curated/ pairs (its web captions when it has not been filtered).
    Re-running the same command resumes from the newest checkpoint in --out; run it under
    `accelerate launch -m capfilt pretrain ...` for several GPUs.

    Example: capfilt pretrain ds1 ds2 --out runs/base --preset base --batch-size 75
    """
    from capfilt.training.loop import TrainConfig, train

    config = TrainConfig(
        datasets=tuple(datasets),
        out=out,
        task="pretrain",
        preset=preset.value,
        init=tuple(init or ()),
        tokenizer=tokenizer,
        source=source.value,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        queue_size=queue_size,
        precision=precision,
        compile=compile,
        flip=flip,
        seed=seed,
        save_every=save_every,
        keep_last=keep_last,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    _train_summary(train(config, console=console()))


@command()
def finetune(
    datasets: Annotated[list[str], typer.Argument(help="Dataset folders (e.g. COCO ingested).")],
    init: Annotated[list[str], typer.Option(help="A capfilt run folder (or HF BLIP weights).")],
    out: RunOut,
    task: Annotated[
        FinetuneTask, typer.Option(help="caption: LM with a prompt; itm: ITC + ITM (the filter).")
    ] = FinetuneTask.caption,
    prompt: Annotated[str, typer.Option(help="Captioner prompt (its tokens get no loss).")] = (
        "a picture of "
    ),
    source: SourceOpt = Source.all,
    batch_size: BatchOpt = 32,
    grad_accum: AccumOpt = 1,
    epochs: EpochsOpt = 5,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-5,
    warmup_steps: WarmupOpt = 0,
    weight_decay: WeightDecayOpt = 0.05,
    queue_size: QueueOpt = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    flip: FlipOpt = True,
    seed: SeedOpt = 42,
    save_every: SaveEveryOpt = 1000,
    keep_last: KeepOpt = 2,
    num_workers: WorkersOpt = 4,
    overwrite: OverwriteRunOpt = False,
):
    """Finetune a pretrained MED into a captioner (LM) or a filter (ITC + ITM), as on COCO.

    Then `capfilt export --out DIR` writes the Hugging Face checkpoints caption/filter load.

    Example: capfilt finetune coco --task caption --init runs/base --out runs/base-cap
    """
    from capfilt.training.loop import TrainConfig, train

    config = TrainConfig(
        datasets=tuple(datasets),
        out=out,
        task=task.value,
        init=tuple(init),
        source=source.value,
        prompt=prompt,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        min_lr=0.0,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        queue_size=queue_size,
        precision=precision,
        compile=compile,
        flip=flip,
        seed=seed,
        save_every=save_every,
        keep_last=keep_last,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    _train_summary(train(config, console=console()))


@command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A capfilt run folder (or one step-N of it).")],
    out: Annotated[str, typer.Option("--out", help="Folder for captioner/ and filter/.")],
    only: Annotated[
        list[str] | None, typer.Option(help="Export only 'captioner' or 'filter'.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing folders.")] = False,
):
    """Write a run's newest checkpoint as Hugging Face BLIP checkpoints (safetensors).

    `OUT/captioner` is a BlipForConditionalGeneration and `OUT/filter` a
    BlipForImageTextRetrieval, each with its processor; caption/filter and plain
    transformers load them.

    Example: capfilt export runs/base --out models/base
    """
    from capfilt.training.export import KINDS, export_run

    written = export_run(run_dir, out, tuple(only or KINDS), overwrite=overwrite)
    for kind, folder in written.items():
        console().print(f"[bold green]✓[/] {kind}: {folder}")


# --- evaluate (capfilt/training/evaluate.py) ----------------------------------------------
def percent(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


@command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="A capfilt run folder (pretrain or finetune), an export folder, or a BLIP ITM "
            "checkpoint (local dir or hub id)."
        ),
    ],
    dataset: DatasetArg,
    caption_col: Annotated[
        str, typer.Option(help="Column of images/ with the reference texts (e.g. true_caption).")
    ] = "caption",
    batch_size: Annotated[int, typer.Option(help="Images or texts per forward pass.")] = 64,
    max_images: Annotated[
        int | None, typer.Option(help="Evaluate on the first N usable images only.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the result as JSON to this file.")
    ] = None,
):
    """Image-text retrieval recall (R@1, R@5, R@10) of a model, by ITC similarity.

    Image→text ranks every distinct text of DATASET for each image; text→image ranks every
    image for each distinct text. A hit is any pair the dataset holds, so repeated texts
    and several captions per image count as in COCO retrieval.

    Example: capfilt evaluate runs/base coco-test --json
    """
    import json

    from capfilt.training.evaluate import EvaluateConfig, evaluate_retrieval

    config = EvaluateConfig(
        caption_col=caption_col, batch_size=batch_size, max_images=max_images, device=device
    )
    result = evaluate_retrieval(model, dataset, config)
    text = json.dumps(result.to_dict(), indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if json_output:
        print(text)
        return
    from rich.table import Table

    table = Table(
        "direction",
        *result.image_to_text,
        title=(
            f"retrieval · {model}{'' if result.step is None else f' (step {result.step})'} · "
            f"{result.images} images, "
            f"{result.texts} distinct texts"
        ),
    )
    for name, recalls in (
        ("image → text", result.image_to_text),
        ("text → image", result.text_to_image),
    ):
        table.add_row(name, *(percent(v) for v in recalls.values()))
    console().print(table)
    if result.skipped:
        console().print(
            "skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items())
        )
