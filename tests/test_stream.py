"""Streaming training data: each pair once per epoch across processes, a seeded order, exact
resumption, bounded memory, weights, and a WebDataset folder as a source."""

from __future__ import annotations

import pytest
from conftest import write_images_dataset

from capfilt.core.errors import CapfiltError
from capfilt.training.stream import (
    EpochBatches,
    Picking,
    batches_per_epoch,
    build_plan,
    epoch_layout,
    load_or_build_plan,
    shuffle_order,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """7 shards of 10 rows: 8 downloaded images each (every 5th row failed)."""
    root = tmp_path_factory.mktemp("stream") / "ds"
    write_images_dataset(root, n_shards=7, per_shard=10)
    return root


def epoch_pairs(plan, sources, epoch, rank, world, batch, buffer, skip=0, seed=3):
    batches = batches_per_epoch(plan, seed, epoch, world, batch)
    sampler = EpochBatches(plan, sources, seed, rank, world, batch, buffer)
    sampler.set_epoch(epoch, batches, skip)
    return list(sampler), sampler


def test_every_pair_once_per_epoch_in_equal_disjoint_parts(dataset):
    plan, sources = build_plan((str(dataset),), (1.0,), Picking("all", 30))
    assert plan.pairs == 56
    for world in (1, 2, 3):
        parts = []
        for rank in range(world):
            batches, _ = epoch_pairs(plan, sources, 0, rank, world, batch=4, buffer=16)
            parts.append([item[2] for batch in batches for item in batch])
        assert len({len(p) for p in parts}) == 1  # the same number of steps everywhere
        keys = [k for p in parts for k in p]
        assert len(keys) == len(set(keys))  # disjoint
        per_rank = 56 // world // 4 * 4
        assert len(keys) == world * per_rank
        if world == 1:
            assert sorted(keys) == sorted(
                c.key for u in plan.units for c in sources[0].candidates(u.shard, {})
            )


def test_the_order_is_seeded_by_epoch_and_the_same_every_time(dataset):
    plan, sources = build_plan((str(dataset),), (1.0,), Picking("all", 30))
    first, _ = epoch_pairs(plan, sources, 0, 0, 1, 4, 16)
    again, _ = epoch_pairs(plan, sources, 0, 0, 1, 4, 16)
    other, _ = epoch_pairs(plan, sources, 1, 0, 1, 4, 16)
    assert first == again
    assert [i[2] for b in first for i in b] != [i[2] for b in other for i in b]
    assert sorted(i[2] for b in first for i in b) == sorted(i[2] for b in other for i in b)


@pytest.mark.parametrize("buffer", [1, 5, 16, 1000])
def test_a_resumed_epoch_yields_exactly_the_batches_left(dataset, buffer):
    plan, sources = build_plan((str(dataset),), (1.0,), Picking("all", 30))
    for world, rank in ((1, 0), (2, 1)):
        whole, _ = epoch_pairs(plan, sources, 2, rank, world, 4, buffer)
        for skip in (1, 3, len(whole) - 1):
            resumed, sampler = epoch_pairs(plan, sources, 2, rank, world, 4, buffer, skip)
            assert resumed == whole[skip:], (buffer, world, skip)
            assert not sampler.loaded  # every image read was handed on


def test_memory_holds_the_buffer_and_one_shard(dataset):
    plan, sources = build_plan((str(dataset),), (1.0,), Picking("all", 30))
    _, sampler = epoch_pairs(plan, sources, 0, 0, 1, 4, 6)
    peak = 0
    for _ in sampler:
        peak = max(peak, len(sampler.loaded))
    assert 0 < peak <= 6 + max(u.pairs for u in plan.units)


def test_shuffle_order_emits_each_position_once():
    for count, buffer in ((0, 3), (5, 10), (20, 3), (20, 1)):
        emitted = [p for p, _ in shuffle_order(count, buffer, "s")]
        assert sorted(emitted) == list(range(count))
        for p, pushed in shuffle_order(count, buffer, "s"):
            assert p < pushed or pushed == count


def test_weights_repeat_a_dataset_or_take_part_of_it(dataset, tmp_path):
    small = tmp_path / "small"
    write_images_dataset(small, n_shards=2, per_shard=5, seed=5)  # 8 pairs
    plan, _ = build_plan((str(dataset), str(small)), (1.0, 2.0), Picking("all", 30))
    assert [(m["weight"], m["pairs"], m["by_source"]) for m in plan.mix()] == [
        (1.0, 56, {"web": 56}),
        (2.0, 8, {"web": 8}),
    ]
    layout = epoch_layout(plan, 0, 0, 0, 1)
    assert sum(plan.units[u].pairs for u in layout.units) == 56 + 2 * 8
    plan, _ = build_plan((str(dataset), str(small)), (0.5, 1.0), Picking("all", 30))
    layout = epoch_layout(plan, 0, 0, 0, 1)
    from_first = [u for u in layout.units if plan.units[u].source == 0]
    assert len(from_first) == round(0.5 * 7)  # 4 of its 7 shards
    chosen = [
        frozenset(u for u in epoch_layout(plan, 0, e, 0, 1).units if plan.units[u].source == 0)
        for e in range(6)
    ]
    assert {len(c) for c in chosen} == {4} and len(set(chosen)) > 1  # another part each epoch
    with pytest.raises(CapfiltError, match="one per dataset"):
        build_plan((str(dataset),), (1.0, 2.0), Picking("all", 30))


def test_a_webdataset_export_is_a_training_source(tmp_path):
    from _report_fixtures import write_scored_dataset

    from capfilt.core.layout import Dataset
    from capfilt.stages.export_data import export_data

    scored = write_scored_dataset(tmp_path / "ds")
    export_data(Dataset(scored.root), "webdataset", str(tmp_path / "wds"))
    plan, sources = build_plan((str(tmp_path / "wds"),), (1.0,), Picking("all", 30))
    layout_plan, layout_sources = build_plan((scored.root,), (1.0,), Picking("all", 30))
    assert plan.pairs == layout_plan.pairs == len(scored.kept(0.5))
    batches, _ = epoch_pairs(plan, sources, 0, 0, 1, 3, 8)
    assert all(
        isinstance(item[0], bytes) and item[0][:2] == b"\xff\xd8" for b in batches for item in b
    )
    web_only, _ = build_plan((str(tmp_path / "wds"),), (1.0,), Picking("web", 30))
    assert web_only.pairs == sum(1 for _, _, source in scored.kept(0.5) if source == "web")


def test_resuming_on_other_data_is_refused(dataset, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    plan, _ = build_plan((str(root),), (1.0,), Picking("all", 30))
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_plan.json").write_text(plan.to_json())
    again, _ = load_or_build_plan(
        run, (str(root),), (1.0,), Picking("all", 30), None, resuming=True
    )
    assert again == plan
    from capfilt.core.layout import Dataset

    ds = Dataset(str(root))
    ds.write_shard("images", 3, ds.read_shard("images", 3))  # the same rows, another write
    with pytest.raises(CapfiltError, match="shard 00003 changed"):
        load_or_build_plan(run, (str(root),), (1.0,), Picking("all", 30), None, resuming=True)
    with pytest.raises(CapfiltError, match="--source"):
        load_or_build_plan(run, (str(root),), (1.0,), Picking("web", 30), None, resuming=True)


def test_a_web_synthetic_ratio_thins_the_more_frequent_kind(tmp_path):
    from collections import Counter

    from _report_fixtures import write_scored_dataset

    from capfilt.training.config import TrainConfig

    scored = write_scored_dataset(tmp_path / "ds")
    have = Counter(source for _, _, source in scored.kept(0.5))
    assert have["synthetic"] > 2 * have["web"] > 0  # the fixture's mix: thinning is needed

    def kinds(ratio, seed=0):
        plan, sources = build_plan((scored.root,), (1.0,), Picking("all", 30, (), seed), ratio)
        pairs = [c for u in plan.units for c in sources[0].candidates(u.shard, {})]
        return Counter(c.source for c in pairs), {c.key for c in pairs}, plan

    for ratio in ((1.0, 1.0), (1.0, 2.0)):
        counts, keys, plan = kinds(ratio)
        assert counts["web"] == have["web"]  # the rarer kind is kept whole
        expected = have["web"] * ratio[1] / ratio[0]
        assert abs(counts["synthetic"] - expected) <= 0.5 * expected  # a seeded sample
        assert plan.skipped["left out for --web-synthetic-ratio"] == (
            have["synthetic"] - counts["synthetic"]
        )
        assert kinds(ratio) == (counts, keys, plan)  # the same choice every time
        assert plan.mix() == [
            dict(dataset=scored.root, weight=1.0, pairs=sum(counts.values()), by_source=counts)
        ]
    assert kinds((1.0, 1.0), seed=1)[1] != kinds((1.0, 1.0), seed=0)[1]
    with pytest.raises(CapfiltError, match="needs pairs of both kinds"):
        build_plan((scored.root,), (1.0,), Picking("web", 30), (1.0, 1.0))
    where = dict(datasets=[scored.root], out=str(tmp_path / "run"))
    assert TrainConfig(web_synthetic_ratio="1:2", **where).ratio == (1.0, 2.0)
    for bad in ("2", "1:0", "a:b"):
        with pytest.raises(CapfiltError, match="W:S"):
            TrainConfig(web_synthetic_ratio=bad, **where).check()


def test_processes_share_the_reading_of_the_plan_and_get_the_same_plan(dataset, tmp_path):
    import threading

    from _report_fixtures import write_scored_dataset

    scored = write_scored_dataset(tmp_path / "scored")
    roots = (str(dataset), scored.root)
    world = 3

    def all_gather():
        barrier, slots = threading.Barrier(world), {}

        def gather_from(rank):
            def gather(obj):
                barrier.wait()
                slots[rank] = obj
                barrier.wait()
                return [slots[r] for r in range(world)]

            return gather

        return gather_from

    for ratio in (None, (1.0, 1.0)):
        alone, _ = build_plan(roots, (1.0, 2.0), Picking("all", 30), ratio)
        plans, gather_from = {}, all_gather()

        def build(rank, gather_from=gather_from, plans=plans, ratio=ratio):
            plans[rank] = build_plan(
                roots, (1.0, 2.0), Picking("all", 30), ratio, (rank, world), gather_from(rank)
            )[0]

        threads = [threading.Thread(target=build, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [plans[r] for r in range(world)] == [alone] * world
