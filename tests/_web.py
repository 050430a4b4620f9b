"""Helpers for tests that download from the toy web on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from capfilt.demo import toyweb


@dataclass
class LocalWeb:
    """A toy web written under `root` and served while the context is open."""

    root: Path
    pairs: list[toyweb.ToyPair]
    server: toyweb.ToyWebServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def rows(self, broken: bool = True) -> list[dict]:
        rows = toyweb.url_rows(self.pairs, self.base_url)
        return rows + (toyweb.broken_rows(self.base_url) if broken else [])

    def requested(self) -> list[str]:
        return [path for path, _ in self.server.requests]


@contextmanager
def local_web(
    root: Path, n: int = 12, wrong_fraction: float = 0.25, seed: int = 3
) -> Iterator[LocalWeb]:
    pairs = toyweb.generate(n, wrong_fraction, seed, image_size=48)
    toyweb.write_images(pairs, root)
    with toyweb.ToyWebServer(root) as server:
        toyweb.wait_until_served(server.base_url + "/")
        yield LocalWeb(root, pairs, server)


def expected_status(url: str) -> tuple[str, str | None]:
    """(status, error substring) the row of `url` must get in images/."""
    for page in toyweb.BROKEN_PAGES.values():
        if url.endswith(page.path):
            return page.status, page.error
    return "success", None


def read_images(dataset: Path):
    """Every row of DATASET/images/ as a list of dicts (without the image bytes)."""
    from capfilt.core.layout import Dataset

    table = Dataset(str(dataset)).read_stage("images")
    return table.drop_columns(["jpg"]).to_pylist() if table is not None else []


def write_list(rows: list[dict], path: Path, fmt: str) -> Path:
    """Write URL-list rows in one of the formats `capfilt fetch` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return toyweb.write_url_list(rows, path)
    if fmt == "tsv":
        columns = list(rows[0])
        lines = ["\t".join(columns)] + [
            "\t".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "txt":
        path.write_text("".join(r["url"] + "\n" for r in rows))
    else:
        raise ValueError(fmt)
    return path
