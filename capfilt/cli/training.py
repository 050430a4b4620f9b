"""The training commands: pretrain, finetune, export, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.app import DatasetArg, command, console, literal, markup
from capfilt.cli.options import with_options
from capfilt.training.config import FINETUNE_DEFAULTS, TrainConfig
from capfilt.training.evaluate import EvaluateConfig


# --- pretrain, finetune, export (capfilt/training/) --------------------------------------------
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
        out.print(
            literal("skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items()))
        )
    if result.checkpoint:
        out.print(literal(f"checkpoint: {result.checkpoint}"), soft_wrap=True)


@command()
@with_options(TrainConfig, exclude=("task", "prompt"))
def pretrain(options: TrainConfig):
    """Pretrain BLIP's MED model (ITC + ITM + LM) on one or more datasets through Accelerate.

    Streams each dataset's curated/ pairs (its web captions when it has not been filtered),
    or a folder written by `export-data --format webdataset`, shard by shard: memory holds the
    shuffle buffer and a shard or two, whatever the dataset's size. Re-running the same command
    resumes from the newest checkpoint in --out on the same batches; run it under
    `accelerate launch -m capfilt pretrain ...` or torchrun for several GPUs and nodes.

    Example: capfilt pretrain ds1 ds2 --out runs/base --preset base --batch-size 75
    """
    from capfilt.training.loop import train

    _train_summary(train(options, console=console()))


@command()
@with_options(
    TrainConfig,
    # The model comes from --init, its sharing too: BLIP finetunes the captioner and the filter
    # as separate models, so the tying only decides what one kind's finetuning does to the
    # other kind's weights, which this run's export of its own kind does not use.
    exclude=("preset", "tokenizer", "sharing"),
    defaults=FINETUNE_DEFAULTS,
    required=("init",),
    choices={"task": ("caption", "itm", "pretrain")},
)
def finetune(options: TrainConfig):
    """Finetune a pretrained MED into a captioner (LM) or a filter (ITC + ITM), as on COCO.

    Then `capfilt export --out DIR` writes the Hugging Face checkpoints caption/filter load.
    --task pretrain finetunes one model with all three losses, a captioner and a filter that
    share their parameters (BLIP's Table 4 shows separate ones curate better).

    Example: capfilt finetune coco --task caption --init runs/base --out runs/base-cap
    """
    from capfilt.training.loop import train

    _train_summary(train(options, console=console()))


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
        console().print(markup(f"[bold green]✓[/] {kind}: {{folder}}", folder=folder))


# --- evaluate (capfilt/training/evaluate.py) ----------------------------------------------
def percent(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


@command()
@with_options(EvaluateConfig)
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="A capfilt run folder (pretrain or finetune), an export folder, or a BLIP ITM "
            "or captioner checkpoint (local dir or hub id)."
        ),
    ],
    dataset: DatasetArg,
    options: EvaluateConfig,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the result as JSON to this file.")
    ] = None,
):
    """Image-text retrieval recall (R@1, R@5, R@10) by ITC similarity, and captioning scores.

    Image→text ranks every distinct text of DATASET for each image; text→image ranks every
    image for each distinct text. A hit is any pair the dataset holds, so repeated texts
    and several captions per image count as in COCO retrieval.

    When MODEL can caption, every distinct image is captioned as BLIP's COCO evaluation does
    (beam search, 3 beams, 5 to 20 tokens, prompt "a picture of ") and the captions are scored
    against all of the image's texts with COCO's BLEU-4, CIDEr, METEOR and SPICE
    (pycocoevalcap); a metric that cannot run here is left out with the reason.

    Example: capfilt evaluate runs/base coco-test --json
    """
    import json

    from capfilt.training.evaluate import evaluate_model

    result = evaluate_model(model, dataset, options, progress=not json_output)
    text = json.dumps(result.to_dict(), indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if json_output:
        print(text)
        return
    from rich.table import Table

    step = "" if result.step is None else f" (step {result.step})"
    if result.image_to_text is not None:
        table = Table(
            "direction",
            *result.image_to_text,
            title=literal(
                f"retrieval · {model}{step} · {result.images} images, {result.texts} distinct texts"
            ),
        )
        for name, recalls in (
            ("image → text", result.image_to_text),
            ("text → image", result.text_to_image),
        ):
            table.add_row(name, *(percent(v) for v in recalls.values()))
        console().print(table)
    if result.captioning is not None:
        _print_captioning(result.captioning, f"{model}{step}")
    for part, why in result.not_scored.items():
        console().print(literal(f"{part} not scored: {why}"), soft_wrap=True)
    if result.skipped:
        console().print(
            literal("skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items()))
        )


def _print_captioning(scores: dict, model: str) -> None:
    from rich.table import Table

    from capfilt.training.caption_metrics import METRIC_NAMES

    decoding = scores["decoding"]
    out = console()
    out.print(
        literal(
            f"captioning · {model} · {scores['images']} distinct images, "
            f"{scores['references']} references · beam search of {decoding['num_beams']}, "
            f"prompt {decoding['prompt']!r} · {scores['tokenizer']} tokenizer"
        ),
        soft_wrap=True,
    )
    computed = [metric for metric in METRIC_NAMES if metric in scores]
    if computed:
        table = Table(*(METRIC_NAMES[metric] for metric in computed))
        table.add_row(*(f"{scores[metric]:.4f}" for metric in computed))
        out.print(table)
    names = {**METRIC_NAMES, "ptb_tokenizer": "PTB tokenizer"}
    for metric, why in scores["unavailable"].items():
        out.print(literal(f"{names.get(metric, metric)} left out: {why}"), soft_wrap=True)
