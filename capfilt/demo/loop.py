"""`capfilt demo`: the whole CapFilt bootstrap loop, offline, on a generated toy web.

The demo writes three toy data sets, serves the web one on 127.0.0.1, and runs
`pipelines/demo.toml` through the pipeline runner; the pipeline file is the recipe:

    DIR/toy/web/        the synthetic web: images/*.jpg and urls.csv (with the truth columns)
    DIR/toy/annotated/  a small clean set, as a human-annotated one (images + captions.csv)
    DIR/toy/heldout/    held-out toy scenes with their true captions, for retrieval
    DIR/web/            the dataset fetched from the toy web → captions/ scores/ curated/ reports/
    DIR/annotated/      the clean set, ingested (plays COCO)
    DIR/heldout/        the held-out set, ingested
    DIR/runs/           pretrain on the noisy web, finetuned captioner and filter, pretrain
                        after CapFilt
    DIR/models/         the exported captioner/ and filter/ (HF BLIP checkpoints)
    DIR/eval/           retrieval R@K of both pretraining runs (JSON)

Afterwards `demo_figures` gathers what the loop shows: the filter's precision and recall at
catching the wrong web captions (against the truth), synthetic captions beside the truth,
and retrieval R@1 of the model pretrained on the noisy web against the one pretrained
after CapFilt.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.options import Options, option
from capfilt.demo import toyweb

TOY_DIR = "toy"
DATASET_DIR = "web"
EVAL_DIR = "eval"
CAPTIONS_FILE = "captions.csv"
CONFIG_FILE = "demo.json"
# Everything the pipeline derives from the toy data (cleared when the toy data changes).
DERIVED_DIRS = (TOY_DIR, DATASET_DIR, "annotated", "heldout", "runs", "models", EVAL_DIR)
# The pretraining runs the demo compares (label, name of their evaluation file).
COMPARED_RUNS = (("noisy web", "web"), ("after CapFilt", "capfilt"))
DEFAULT_PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "demo.toml"


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Options):
    """Sizes of the toy data; the training recipe itself lives in the pipeline file."""

    images: int = option(2000, "Toy web image-text pairs.", ge=2)
    annotated_images: int = option(
        1000, "Pairs of the clean, human-annotated-like set (plays COCO).", ge=2
    )
    heldout_images: int = option(300, "Held-out pairs for retrieval R@K.", ge=2)
    wrong_fraction: float = option(0.3, "Fraction of web captions that are wrong.", ge=0, le=1)
    seed: int = option(0, "Random seed of the toy data and of the training runs.")
    image_size: int = 96


@dataclass
class ToyData:
    root: Path
    web_pairs: list[toyweb.ToyPair]
    wrong_captions: int


def write_annotated_set(pairs: list[toyweb.ToyPair], folder: Path) -> Path:
    """Write a folder of images with a captions.csv of their TRUE captions (`capfilt ingest`)."""
    toyweb.write_images(pairs, folder)
    path = folder / CAPTIONS_FILE
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file_name", "caption"])
    for pair in pairs:
        writer.writerow([f"{toyweb.IMAGES_DIR}/{pair.name}", pair.true_caption])
    toyweb.write_if_changed(path, text.getvalue().encode("utf-8"))
    return path


def make_toy_data(root: str | os.PathLike, config: DemoConfig) -> ToyData:
    """Generate the toy web and the clean annotated and held-out sets (distinct seeds).

    A folder that holds a demo of other sizes is cleared first: its shards and runs would
    otherwise resume with the wrong data.
    """
    root = Path(root)
    stamp = root / CONFIG_FILE
    if stamp.exists():
        if json.loads(stamp.read_text()) != asdict(config):
            for name in DERIVED_DIRS:
                shutil.rmtree(root / name, ignore_errors=True)
    elif any((root / name).exists() for name in DERIVED_DIRS):
        # Not a folder this demo wrote: never delete what someone else keeps there.
        raise CapfiltError(
            f"{str(root)!r} already holds some of {', '.join(DERIVED_DIRS)} but no "
            f"{CONFIG_FILE}; give the demo a new or empty folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    size = config.image_size
    web = toyweb.generate(config.images, config.wrong_fraction, config.seed, size)
    toyweb.write_images(web, root / TOY_DIR / "web")
    annotated = toyweb.generate(config.annotated_images, 0.0, config.seed + 1, size)
    write_annotated_set(annotated, root / TOY_DIR / "annotated")
    heldout = toyweb.generate(config.heldout_images, 0.0, config.seed + 2, size)
    write_annotated_set(heldout, root / TOY_DIR / "heldout")
    stamp.write_text(json.dumps(asdict(config), indent=2))
    return ToyData(root, web, sum(p.caption_is_wrong for p in web))


@contextmanager
def serve_toy_web(data: ToyData, lifetime_s: float = 3600.0) -> Iterator[dict]:
    """Serve DIR/toy/web on 127.0.0.1, write its urls.csv, and yield the pipeline's variables.

    The URL list names the server's port, and a list that changed is another source to
    `capfilt fetch`: a re-run serves on the port of the run before when it is free, so that
    the list stays the same and the demo resumes.
    """
    root = data.root
    port = _previous_port(root / TOY_DIR / "web" / toyweb.URL_LIST)
    with toyweb.ToyWebServer(root / TOY_DIR / "web", lifetime_s=lifetime_s, port=port) as web:
        rows = toyweb.url_rows(data.web_pairs, web.base_url) + toyweb.broken_rows(web.base_url)
        url_list = toyweb.write_url_list(rows, root / TOY_DIR / "web" / toyweb.URL_LIST)
        toyweb.wait_until_served(web.base_url + "/")
        yield {
            "root": str(root),
            "base_url": web.base_url,
            "url_list": str(url_list),
            "dataset": str(root / DATASET_DIR),
        }


def _previous_port(url_list: Path) -> int:
    """The port in the URLs of an earlier run's list, 0 when there is none."""
    import re

    try:
        with open(url_list) as f:
            f.readline()
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", f.readline())
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


@dataclass
class DemoFigures:
    """What the loop shows, read back from the files its stages wrote."""

    truth: dict | None  # the report's filter-against-truth figures
    caption_samples: list[dict] = field(default_factory=list)  # synthetic vs true caption
    synthetic_correct: float | None = None  # fraction of synthetic captions equal to the truth
    retrieval: dict[str, dict] = field(default_factory=dict)  # label → evaluate's JSON
    kept: dict[str, int] = field(default_factory=dict)  # curated pairs by source
    report: str | None = None  # where the HTML report is


def demo_figures(root: str | os.PathLike, samples: int = 8) -> DemoFigures:
    """Read the report, the synthetic captions and the evaluations of a finished demo."""
    from capfilt.stages.query import run_query
    from capfilt.stages.report import read_summary, report_file
    from capfilt.training.pairs import pre_caption

    root = Path(root)
    dataset = Dataset(str(root / DATASET_DIR))
    summary = read_summary(dataset)
    truth = summary.get("truth") if summary else None
    figures = DemoFigures(truth, report=report_file(dataset) if summary else None)
    if dataset.has_stage("captions"):
        _, rows = run_query(
            dataset,
            "select c.text, i.true_caption from captions c join images i using (key) "
            "where c.status = 'success' and i.true_caption is not null order by c.key",
        )
        if rows:
            same = sum(pre_caption(t or "", 30) == pre_caption(truth_, 30) for t, truth_ in rows)
            figures.synthetic_correct = same / len(rows)
            step = max(1, len(rows) // samples)
            figures.caption_samples = [
                {"synthetic": t, "truth": truth_} for t, truth_ in rows[::step][:samples]
            ]
    if dataset.has_stage("curated"):
        _, rows = run_query(dataset, "select source, count(*) from curated group by 1 order by 1")
        figures.kept = {source: n for source, n in rows}
    for label, name in COMPARED_RUNS:
        path = root / EVAL_DIR / f"{name}.json"
        if path.exists():
            figures.retrieval[label] = json.loads(path.read_text())
    return figures
