"""Tools around the pipeline: toyweb, demo, run (a pipeline file), bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.bench import BenchConfig
from capfilt.cli.app import app, command, console, literal, markup
from capfilt.cli.options import with_options
from capfilt.cli.training import percent
from capfilt.core.errors import CapfiltError
from capfilt.demo.loop import DemoConfig


@command()
def toyweb(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write images/ and urls.csv into.")],
    images: Annotated[int, typer.Option(help="Number of image-text pairs.")] = 200,
    wrong_fraction: Annotated[
        float, typer.Option(help="Fraction of captions that are wrong like web alt-text.")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same web.")] = 0,
    image_size: Annotated[int, typer.Option(help="Side of the rendered images in pixels.")] = 96,
    base_url: Annotated[
        str, typer.Option(help="Where OUT_DIR will be served; the URLs of urls.csv start with it.")
    ] = "http://127.0.0.1:8000",
):
    """Write a synthetic toy web: rendered scenes with known true captions, some captions wrong.

    urls.csv has the columns url, caption, true_caption, caption_is_wrong and wrong_kind
    (other_image, file_name, boilerplate, wrong_color, wrong_shape); `capfilt fetch` keeps them.

    Example: capfilt toyweb toy --images 500 && python -m http.server 8000 --directory toy
    """
    from capfilt.demo import toyweb as toyweb_stage

    if not 0.0 <= wrong_fraction <= 1.0:
        raise CapfiltError(f"--wrong-fraction must be between 0 and 1, got {wrong_fraction}")
    if images < 1:
        raise CapfiltError("--images must be at least 1")
    try:
        pairs, url_list = toyweb_stage.write_toyweb(
            out_dir, images, wrong_fraction, seed, base_url=base_url, image_size=image_size
        )
    except OSError as e:
        raise CapfiltError(f"cannot write the toy web to {str(out_dir)!r}: {e}") from e
    wrong = sum(p.caption_is_wrong for p in pairs)
    port = base_url.rsplit(":", 1)[-1].strip("/") if base_url.count(":") > 1 else "80"
    console().print(
        literal(
            f"wrote {len(pairs)} images ({wrong} with a wrong caption) to {out_dir}/images and "
            f"{url_list}\nserve it with: python -m http.server {port} --bind 127.0.0.1 "
            f"--directory {out_dir}"
        )
    )


# --- run (capfilt/cli/pipeline.py) ------------------------------------------------------------
@command()
def run(
    pipeline_file: Annotated[
        Path, typer.Argument(help="A pipeline TOML, e.g. pipelines/demo.toml.")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a [pipeline] variable: --set cc3m=/data/cc3m."),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these stages (by command name).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the commands without running them.")] = False,
):
    """Run a whole pipeline file: its stages in order, each as the capfilt command it names.

    Finished shards are skipped by every stage, so re-running a pipeline resumes it.

    Example: capfilt run pipelines/blip_base_cc3m_coco.toml --set cc3m=/data/cc3m
    """
    import shlex

    from capfilt.cli.pipeline import load_pipeline

    overrides = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise CapfiltError(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value
    pipeline = load_pipeline(pipeline_file, overrides)
    out = console()
    for i, stage in enumerate(pipeline.stages, 1):
        if only and stage.command not in only:
            continue
        argv = stage.argv()
        out.print(
            markup(
                f"[bold]▶ {{name}} {i}/{len(pipeline.stages)}:[/] capfilt {{argv}}",
                name=pipeline.name,
                argv=shlex.join(argv),
            ),
            soft_wrap=True,
        )
        if dry_run:
            continue
        try:
            # Without standalone mode click returns a command's exit code instead of exiting.
            exit_code = app(argv, standalone_mode=False)
        except typer.TyperException as e:  # usage errors (typer's click): unknown option, bad value
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            raise CapfiltError(f"stage {i} ({stage.command}): {message}") from None
        if isinstance(exit_code, int) and exit_code != 0:
            console(stderr=True).print(
                markup(f"[bold red]stage {i} ({{command}}) failed[/]", command=stage.command)
            )
            raise typer.Exit(exit_code)


# --- bench (capfilt/bench/) ---------------------------------------------------------------------
@command()
@with_options(BenchConfig)
def bench(
    options: BenchConfig,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Measure a stage's throughput against the plain Hugging Face recipe, in one run.

    Prints images/s of plain transformers and of capfilt on the same weights, images and
    precision, their ratio, the achieved TFLOP/s and the fraction of the FLOP bound.

    Example: capfilt bench caption --arch base --images 64 --batch-size 32 --json
    """
    from capfilt.bench import run_bench

    result = run_bench(options)
    if json_output:
        import json

        print(json.dumps(result, indent=2))
        return
    print_bench(result)


def print_bench(result: dict) -> None:
    from rich.table import Table

    if "data" in result:
        print_bench_data(result)
        return
    out = console()
    out.print(
        markup(
            f"[bold]{result['workload']}[/] · {{model}} · {result['device']} · "
            f"{result['dtype']} · {result['images']} images, batch {result['batch_size']}",
            model=result["model"],
        )
    )
    out.print(f"level: {result['level']}")
    table = Table("", "seconds", "images/s", "pairs/s", "TFLOP/s", "of FLOP bound")
    sides = [("plain HF", "plain_hf"), ("capfilt", "capfilt")]
    for name, key in sides:
        side = result.get(key)
        if side is None:
            continue
        if side.get("error"):
            table.add_row(name, "-", "-", "-", "-", literal(side["error"]))
            continue
        table.add_row(
            name,
            f"{side['seconds']:.3f}",
            f"{side['images_per_s']:.2f}",
            "-" if side["pairs_per_s"] is None else f"{side['pairs_per_s']:.2f}",
            f"{side['tflops']:.4f}",
            f"{100 * side['fraction_of_bound']:.2f} %",
        )
    out.print(table)
    out.print(
        f"work {result['gflops_per_image']:.2f} GFLOP/image; FLOP bound "
        f"{result['bound_tflops']:.2f} TFLOP/s ({result['bound_source']}) = "
        f"{result['flop_bound_images_per_s']:.1f} images/s"
    )
    if result.get("speedup"):
        out.print(f"[bold]capfilt / plain HF: {result['speedup']:.2f}x[/]")
    if result.get("mfu") is not None:
        basis = "data-sheet peak" if result.get("spec_peak_tflops") else "measured bound"
        out.print(f"[bold]MFU {100 * result['mfu']:.1f} %[/] (of the {basis})")


def print_bench_data(result: dict) -> None:
    """`bench … --level data`: the input pipeline per worker count, and what bounds it."""
    from rich.table import Table

    out = console()
    what = {"pretrain": "training input pipeline"}.get(result["workload"], "stage input path")
    out.print(
        markup(
            f"[bold]{result['workload']} {what}[/] · {result['images']} images of 256 px, "
            f"batch {result['batch_size']} · {{model}}",
            model=result["model"],
        )
    )
    table = Table("workers", "images/s", "per worker", "first batch (s)")
    for row in result["data"]:
        per_worker = row["images_per_s_per_worker"]
        table.add_row(
            str(row["workers"]) + (" (main process)" if not row["workers"] else ""),
            f"{row['images_per_s']:.1f}",
            "-" if per_worker is None else f"{per_worker:.1f}",
            f"{row['first_batch_s']:.3f}",
        )
    out.print(table)
    if result.get("scaling_1_to_2"):
        out.print(f"[bold]2 workers / 1 worker: {result['scaling_1_to_2']:.2f}x[/]")
    if result.get("model_images_per_s"):
        out.print(
            f"training step: {result['model_images_per_s']:.1f} images/s "
            f"({result['threads']} torch threads); "
            + (
                "[bold]the model bounds training[/], not the data"
                if result["bound"] == "model"
                else "[bold]the data bounds training[/]: add workers"
            )
        )


# --- demo (capfilt/demo/) ----------------------------------------------------------------------
# The arguments `demo` and `ablate` share.
ToyOutDir = Annotated[Path, typer.Argument(help="Folder for the toy data, datasets and runs.")]
SetVariables = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a pipeline variable, as `capfilt run --set`."),
]
TorchThreads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for torch; the tiny models run fastest on one, with no thread "
        "syncing per tiny matrix product.  [default: 1 on CPU]"
    ),
]


@command()
@with_options(DemoConfig)
def demo(
    out_dir: ToyOutDir,
    options: DemoConfig,
    pipeline: Annotated[
        Path | None, typer.Option(help="Pipeline file to run.  [default: pipelines/demo.toml]")
    ] = None,
    set_: SetVariables = None,
    threads: TorchThreads = None,
):
    """Run the whole CapFilt loop offline on a generated toy web, and print what it achieved.

    Generates a toy web (with known wrong captions), a small clean annotated set and held-out
    scenes, serves the web on 127.0.0.1, and runs pipelines/demo.toml: fetch, pretrain,
    finetune captioner and filter, export, caption, filter, report, pretrain on the curated
    pairs, evaluate. Prints the filter's precision/recall against the truth, synthetic
    captions, and retrieval R@1 before and after CapFilt. Re-running resumes.

    Example: capfilt demo demo
    """
    import time

    from capfilt.demo.loop import DEFAULT_PIPELINE, demo_figures

    started = time.perf_counter()
    run_on_toy_web(out_dir, options, pipeline or DEFAULT_PIPELINE, set_, threads)
    print_demo_figures(demo_figures(out_dir), out_dir, time.perf_counter() - started)


def run_on_toy_web(out_dir: Path, options, pipeline: Path, set_, threads: int | None) -> None:
    """Generate the toy data, serve the web on 127.0.0.1 and run `pipeline` over it."""
    import torch

    from capfilt.demo.loop import make_toy_data, serve_toy_web

    if threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(threads or 1)
    data = make_toy_data(out_dir, options)
    console().print(
        literal(
            f"toy web: {len(data.web_pairs)} pairs, {data.wrong_captions} with a wrong caption; "
            f"{options.annotated_images} annotated and {options.heldout_images} held-out "
            f"pairs; in {out_dir}/toy"
        )
    )
    with serve_toy_web(data) as variables:
        # The seed of the toy data seeds the training runs too (`--set train_seed=N` apart).
        variables = {"train_seed": options.seed, **variables}
        overrides = [f"{name}={value}" for name, value in variables.items()]
        run(pipeline_file=pipeline, set_=overrides + list(set_ or []), only=None, dry_run=False)


@command()
@with_options(DemoConfig)
def ablate(
    out_dir: ToyOutDir,
    options: DemoConfig,
    pipeline: Annotated[
        Path | None,
        typer.Option(help="Pipeline file to run.  [default: pipelines/ablation.toml]"),
    ] = None,
    set_: SetVariables = None,
    threads: TorchThreads = None,
):
    """Run BLIP's four CapFilt ablations in miniature on the toy web, in the paper's layout.

    Tables 1-4 of the BLIP paper: noisy web / +captioner / +filter / both; beam search or
    nucleus sampling; which layers the text encoder and decoder share; a shared or decoupled
    captioner and filter. Each row pretrains the tiny MED with the same recipe and steps and
    evaluates it on held-out scenes (retrieval R@K both ways, caption CIDEr); the paper's
    figures are printed beside for direction. About 40 minutes on two CPU cores; writes
    ablation.md and ablation.json in OUT_DIR. Re-running resumes.

    Example: capfilt ablate ablation --seed 1
    """
    import time

    from capfilt.demo.ablation import (
        DEFAULT_PIPELINE,
        ablation_results,
        print_tables,
        write_results,
    )

    started = time.perf_counter()
    run_on_toy_web(out_dir, options, pipeline or DEFAULT_PIPELINE, set_, threads)
    results = ablation_results(out_dir)
    out = console()
    out.rule("[bold]CapFilt's ablations in miniature (the paper's figures beside)")
    print_tables(results, out)
    path = write_results(out_dir, results)
    minutes = (time.perf_counter() - started) / 60
    out.print(literal(f"done in {minutes:.1f} min; tables: {path}"), soft_wrap=True)


def print_demo_figures(figures, out_dir: Path, seconds: float) -> None:
    from rich.table import Table

    from capfilt.report.figures import compare_models
    from capfilt.report.terminal import models_table

    out = console()
    out.rule("[bold]what CapFilt did on the toy web")
    truth = figures.truth
    if truth:
        out.print(
            f"filter vs the truth: of {truth['wrong']} wrong web captions it dropped "
            f"{truth['caught']} (recall {percent(truth['recall'])}); of {truth['dropped']} web "
            f"captions it dropped, {truth['caught']} were wrong (precision "
            f"{percent(truth['precision'])})"
            + ("" if truth.get("auc") is None else f"; ranking AUC {truth['auc']:.3f}")
        )
    if figures.kept:
        out.print(
            literal("curated pairs: " + ", ".join(f"{n} {s}" for s, n in figures.kept.items()))
        )
    if figures.caption_samples:
        table = Table("synthetic caption", "true caption", title="Synthetic captions (samples)")
        for row in figures.caption_samples:
            table.add_row(literal(row["synthetic"]), literal(row["truth"]))
        out.print(table)
        out.print(f"synthetic captions equal to the truth: {percent(figures.synthetic_correct)}")
    compared = compare_models(figures.retrieval)
    if compared:
        out.print(models_table(compared, "Held-out toy scenes: the two pretrained models"))
    out.print(
        literal(
            f"done in {seconds / 60:.1f} min; report: {figures.report}; "
            f'explore: capfilt query {out_dir}/web "select * from scores limit 5"'
        ),
        soft_wrap=True,
    )
