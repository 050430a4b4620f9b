"""`capfilt demo`: the CapFilt loop on the built-in toy web, offline, in one folder.

    DIR/toyweb/   the synthetic web: images/*.jpg and urls.csv (with the truth columns)
    DIR/web/      the dataset fetched from it (images/, capfilt.json, later stages)

Each stage is its own function so that later stages (caption, filter, pretrain, report)
join the loop one by one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from capfilt import toyweb
from capfilt.fetch import FetchOptions, FetchResult, fetch
from capfilt.layout import Dataset
from capfilt.query import run_query

TOYWEB_DIR = "toyweb"
DATASET_DIR = "web"

# What the demo shows of the fetched dataset (title, SQL).
SUMMARY_QUERIES = (
    (
        "Rows by download status",
        "select status, coalesce(error_message, '') as error, count(*) as rows "
        "from images group by all order by rows desc",
    ),
    (
        "Web captions of the fetched images, against the truth",
        "select coalesce(wrong_kind, 'correct') as caption, count(*) as rows "
        "from images where status = 'success' and true_caption is not null "
        "group by all order by rows desc",
    ),
)


@dataclass
class DemoResult:
    root: Path
    pairs: int
    wrong_captions: int
    fetched: FetchResult
    tables: list[tuple[str, list[str], list[tuple]]] = field(default_factory=list)


def make_toyweb(root: Path, images: int, wrong_fraction: float, seed: int) -> list[toyweb.ToyPair]:
    """Generate the toy web's pairs and write their images under DIR/toyweb/images/."""
    pairs = toyweb.generate(images, wrong_fraction, seed)
    toyweb.write_images(pairs, root / TOYWEB_DIR)
    return pairs


def fetch_toyweb(
    root: Path,
    pairs: list[toyweb.ToyPair],
    on_progress: Callable[[int, int, int], None] | None = None,
    threads: int = 8,
    image_size: int = 96,
) -> FetchResult:
    """Serve DIR/toyweb on 127.0.0.1 and fetch its URL list (and its broken pages) into DIR/web."""
    dataset = Dataset(str(root / DATASET_DIR))
    with toyweb.ToyWebServer(root / TOYWEB_DIR) as web:
        rows = toyweb.url_rows(pairs, web.base_url) + toyweb.broken_rows(web.base_url)
        url_list = toyweb.write_url_list(rows, root / TOYWEB_DIR / toyweb.URL_LIST)
        toyweb.wait_until_served(web.base_url + "/")
        # The server's port changes from run to run, so a re-run resumes by row count;
        # a demo of another size starts again.
        previous = dataset.read_manifest().get("source") or {}
        overwrite = dataset.has_stage("images") and previous.get("rows") != len(rows)
        options = FetchOptions(
            image_size=image_size, threads=threads, shard_size=100, timeout=5, overwrite=overwrite
        )
        return fetch(str(url_list), dataset, options, on_progress=on_progress)


def summarize(root: Path) -> list[tuple[str, list[str], list[tuple]]]:
    """The demo's tables, through the same query machinery as `capfilt query`."""
    dataset = Dataset(str(root / DATASET_DIR))
    tables = []
    for title, sql in SUMMARY_QUERIES:
        columns, rows = run_query(dataset, sql)
        tables.append((title, columns, rows))
    return tables


def run_demo(
    root: str | os.PathLike,
    images: int = 200,
    wrong_fraction: float = 0.3,
    seed: int = 0,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> DemoResult:
    """Generate the toy web, fetch it, and summarize what was fetched."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pairs = make_toyweb(root, images, wrong_fraction, seed)
    fetched = fetch_toyweb(root, pairs, on_progress=on_progress)
    return DemoResult(
        root=root,
        pairs=len(pairs),
        wrong_captions=sum(p.caption_is_wrong for p in pairs),
        fetched=fetched,
        tables=summarize(root),
    )
