"""The stage runner's contract, on a toy stage that needs no model: what is done, redone,
refused, removed and switched, and what each shard's provenance says."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest
from conftest import write_images_dataset

from capfilt.core import parquet, provenance
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.options import Options, option, range_text
from capfilt.stages.runner import Stage, run_stage
from capfilt.stages.status import dataset_status


@dataclass(frozen=True, kw_only=True)
class ShoutOptions(Options):
    suffix: str = option("!", "Appended to every caption.", output=True)
    batch_size: int = option(8, "Does not shape the output.", ge=1)


class ShoutStage(Stage):
    """images/ → captions/: each web caption in capitals (a stand-in for a model)."""

    name = "shout"
    output = "captions"
    unit = "shards"
    processed: list

    def __init__(self, options):
        super().__init__(options)
        self.processed = []

    def process(self, shard, inputs, advance):
        self.processed.append(shard)
        images = inputs["images"]
        rows = [
            dict(
                key=k,
                caption_id=0,
                text=f"{(c or '').upper()}{self.options.suffix}",
                model="shout",
                status="success",
            )
            for k, c in zip(images["key"].to_pylist(), images["caption"].to_pylist(), strict=True)
        ]
        return parquet.rows_to_table(rows, parquet.CAPTIONS_SCHEMA)


def shout(root, **options) -> ShoutStage:
    overwrite = options.pop("overwrite", False)
    stage = ShoutStage(ShoutOptions(**options))
    run_stage(stage, str(root), overwrite=overwrite, progress=False)
    return stage


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=3, per_shard=2)
    return root


def test_done_skipped_other_options_refused_overwrite_redone(dataset):
    ds = Dataset(str(dataset))
    assert shout(dataset).processed == [0, 1, 2]
    record = provenance.read(ds.folder("captions"), 1)
    assert record.options == {"suffix": "!"}
    assert record.inputs == {"images": ds.folder("images").fingerprint(1)}
    assert record.file == ds.folder("captions").fingerprint(1) and record.rows == 2
    assert shout(dataset, batch_size=2).processed == []  # batch size shapes nothing
    with pytest.raises(CapfiltError, match=r"3 of the 3 shards .*--suffix ! → \?"):
        shout(dataset, suffix="?")
    assert shout(dataset, suffix="?", overwrite=True).processed == [0, 1, 2]
    assert set(t[-1] for t in ds.read_stage("captions")["text"].to_pylist()) == {"?"}
    runs = ds.read_manifest()["runs"]
    assert [r["provenance_options"] for r in runs] == [{"suffix": "!"}] * 2 + [{"suffix": "?"}]


def test_an_interrupted_write_a_changed_input_and_a_gone_input(dataset):
    ds = Dataset(str(dataset))
    shout(dataset)
    captions = ds.folder("captions")
    # A kill between the provenance and the rename: the provenance names a file not there.
    record = provenance.read(captions, 0)
    record.file = "sha256:not-this-file"
    provenance.write(captions, 0, record)
    # images/ shard 1 re-fetched; images/ shard 2 deleted.
    ds.write_shard("images", 1, ds.read_shard("images", 1))
    (dataset / "images" / "00002.parquet").unlink()
    status = dataset_status(ds).folder("captions")
    assert status.stale == [0, 1] and status.orphans == [2]
    assert any("a write was interrupted" in r for r in status.reasons)
    assert any("images/ changed since" in r for r in status.reasons)
    assert shout(dataset).processed == [0, 1]  # redone, not refused
    assert captions.shards() == [0, 1]  # the orphan's input is gone: it is removed
    assert not (dataset / "captions" / ".provenance" / "00002.json").exists()


def test_shards_without_provenance_are_refused_until_overwritten(dataset):
    ds = Dataset(str(dataset))
    shout(dataset)
    (dataset / "captions" / ".provenance" / "00001.json").unlink()
    with pytest.raises(CapfiltError, match="no provenance .*00001"):
        shout(dataset)
    assert shout(dataset, overwrite=True).processed == [0, 1, 2]
    assert provenance.read(ds.folder("captions"), 1) is not None


class KeepStage(Stage):
    """captions/ → curated/ (generational): the rows whose text ends with `suffix`."""

    name = "keep"
    output = "curated"
    inputs = ("captions",)
    unit = "shards"

    def process(self, shard, inputs, advance):
        import pyarrow.compute as pc

        table = inputs["captions"]
        keep = pc.ends_with(table["text"], self.options.suffix)
        rows = table.filter(keep)
        return pa.table(
            {
                "key": rows["key"],
                "text_id": rows["caption_id"],
                "source": pa.array(["synthetic"] * rows.num_rows, pa.string()),
                "text": rows["text"],
                "itm_score": pa.array([1.0] * rows.num_rows, pa.float32()),
            }
        )


def test_a_generational_output_switches_only_when_something_changed(dataset):
    ds = Dataset(str(dataset))
    shout(dataset)
    run_stage(KeepStage(ShoutOptions(suffix="!")), ds, progress=False)
    assert ds.current_generation("curated") == 1 and ds.read_stage("curated").num_rows == 6
    run_stage(KeepStage(ShoutOptions(suffix="!")), ds, progress=False)
    assert ds.current_generation("curated") == 1  # nothing changed: no new generation
    run_stage(KeepStage(ShoutOptions(suffix="?")), ds, progress=False)  # never refused
    assert ds.current_generation("curated") == 2 and ds.read_stage("curated").num_rows == 0
    assert ds.folder("curated").record["options"] == {"suffix": "?"}
    shout(dataset, suffix="?", overwrite=True)  # its input changed: the next run switches
    run_stage(KeepStage(ShoutOptions(suffix="?")), ds, progress=False)
    assert ds.current_generation("curated") == 3 and ds.read_stage("curated").num_rows == 6
    assert ds.generations("curated") == [2, 3]


def test_declared_options_check_themselves_and_name_their_flags():
    @dataclass(frozen=True, kw_only=True)
    class Declared(Options):
        ratio: float = option(0.5, "A ratio.", gt=0, le=1, output=True)
        count: int = option(1, "A count.", ge=1, flag="--many")
        mode: str = option("a", "A mode.", choices=("a", "b"))
        plain: int = 3  # library-only: no checks, no flag

    assert Declared().output_options() == {"ratio": 0.5}
    assert Declared().to_record() == {"ratio": 0.5, "count": 1, "mode": "a", "plain": 3}
    for bad, message in (
        (dict(ratio=0), r"--ratio must be in \(0, 1\], got 0"),
        (dict(ratio=float("nan")), "--ratio must be a number"),
        (dict(count=0), "--many must be at least 1, got 0"),
        (dict(mode="c"), "--mode must be one of a, b, not 'c'"),
    ):
        with pytest.raises(CapfiltError, match=message):
            Declared(**bad)
    assert Declared(plain=-5).plain == -5
    spec = next(
        f.metadata["capfilt"] for f in Declared.__dataclass_fields__.values() if f.name == "count"
    )
    assert range_text(spec) == "at least 1"
