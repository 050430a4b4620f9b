"""Benchmarks of dedup on this machine (not timed tests):

    python -m capfilt.dedup.bench --embeddings 1000000 --dim 256
        semantic dedup of N generated float16 embeddings with planted near-duplicates: the
        time, CPU time and peak memory of `semantic_pairs`, and the planted pairs it finds
    python -m capfilt.dedup.bench --images 2000 --groups 1000000
        hashing N generated JPEGs against only decoding them, and the exact + perceptual
        grouping of M generated hashes

Embeddings are drawn around 2,000 topics (two points of one topic have cosine ≈ 0.4, as
unrelated images of one kind do) and 2 % of them are replaced by a near-copy of another point
(cosine 0.97–0.999). Each figure is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

TOPICS = 2000
PLANTED_SHARE = 0.02


def _usage() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return dict(cpu=me.ru_utime + me.ru_stime, peak_rss_kib=me.ru_maxrss)


def planted_embeddings(n: int, dim: int, seed: int = 0):
    """(float16 (n, dim) unit rows, (source, copy) rows of the planted near-duplicates)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float16)
    chunk = 1 << 16
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        rows = centers[rng.integers(TOPICS, size=size)]
        rows += 1.2 * rng.standard_normal((size, dim), dtype=np.float32) / np.sqrt(dim)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start : start + size] = rows
    planted = int(n * PLANTED_SHARE)
    chosen = rng.choice(n, size=2 * planted, replace=False)
    source, copy = chosen[:planted], chosen[planted:]
    noise = rng.uniform(0.05, 0.25, size=(planted, 1)).astype(np.float32)
    near = out[source].astype(np.float32)
    near += noise * rng.standard_normal((planted, dim), dtype=np.float32) / np.sqrt(dim)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    out[copy] = near
    return out, np.stack([source, copy], axis=1)


def bench_embeddings(n: int, dim: int, eps: float, clusters: int | None) -> dict:
    from capfilt.dedup.semantic import semantic_pairs

    started = time.perf_counter()
    embeddings, planted = planted_embeddings(n, dim)
    made = time.perf_counter() - started
    before = _usage()
    started = time.perf_counter()
    found = semantic_pairs(embeddings, eps, clusters)
    wall = time.perf_counter() - started
    after = _usage()
    pairs = set(zip(found.i.tolist(), found.j.tolist(), strict=True))
    truth = {(min(a, b), max(a, b)) for a, b in planted.tolist()}
    hits = len(pairs & truth)
    return dict(
        workload="semantic dedup",
        embeddings=n,
        dim=dim,
        eps=eps,
        clusters=found.clusters,
        largest_cluster=found.largest_cluster,
        pairs_found=len(pairs),
        planted_pairs=len(truth),
        planted_recall=round(hits / len(truth), 4) if truth else None,
        wall_seconds=round(wall, 1),
        cpu_seconds=round(after["cpu"] - before["cpu"], 1),
        peak_rss_mib=round(after["peak_rss_kib"] / 1024),
        generate_seconds=round(made, 1),
        cpus=len(os.sched_getaffinity(0)),
    )


def bench_hashing(images: int, workers: int | None) -> dict:
    """Decoding alone (one process) against hashing (the stage's worker pool)."""
    import io

    from PIL import Image, ImageDraw

    from capfilt.dedup.hashing import HashPool, hash_image
    from capfilt.images.decode import decode_image

    rng = np.random.default_rng(0)
    data = []
    for _ in range(images):
        img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).resize(
            (384, 384), Image.Resampling.BICUBIC
        )
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, 300, 2)
            draw.ellipse((x, y, x + 80, y + 60), fill=tuple(rng.integers(0, 255, 3).tolist()))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        data.append(buf.getvalue())
    started = time.perf_counter()
    for one in data:
        decode_image(one)
    decode = time.perf_counter() - started
    started = time.perf_counter()
    for one in data:
        hash_image(one)
    hash_one = time.perf_counter() - started
    with HashPool(workers) as pool:
        pool.hash(data[: min(64, len(data))])  # start the workers before timing
        started = time.perf_counter()
        pool.hash(data)
        hash_pool = time.perf_counter() - started
        processes = pool.workers
    return dict(
        workload="hashing 384 px JPEGs",
        images=images,
        decode_images_per_s=round(images / decode),
        hash_images_per_s_one_process=round(images / hash_one),
        hash_images_per_s=round(images / hash_pool),
        hash_processes=processes,
        cpus=len(os.sched_getaffinity(0)),
    )


def bench_grouping(n: int, phash_distance: int) -> dict:
    """Exact + perceptual grouping of n generated hashes (20 % copies of another, half of
    them exact, half one pHash bit away)."""
    import pyarrow as pa

    from capfilt.dedup.groups import Nodes, group_images

    rng = np.random.default_rng(0)
    sha = rng.integers(0, 2**62, size=n)
    phash = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    chosen = rng.choice(n, size=2 * (n // 5), replace=False)
    sources, copies = chosen[: n // 5], chosen[n // 5 :]
    half = len(copies) // 2
    sha[copies[:half]] = sha[sources[:half]]  # exact copies
    phash[copies[:half]] = phash[sources[:half]]
    flips = np.int64(1) << rng.integers(0, 63, size=len(copies) - half)
    phash[copies[half:]] = phash[sources[half:]] ^ flips  # 1 bit away
    keys = pa.array([f"{i:09d}" for i in range(n)])
    before, started = _usage(), time.perf_counter()
    from capfilt.dedup.groups import codes

    nodes = Nodes(
        keys=keys.to_pylist(),
        sha256=codes(pa.array(sha)),
        pixel_sha256=codes(pa.array(sha)),
        phash=phash.view(np.uint64),
        has_phash=np.ones(n, dtype=bool),
        color=np.zeros(n, dtype=np.int64),
        url=np.arange(n),
        domain=np.full(n, -1),
        score=np.full(n, np.nan),
        area=np.zeros(n, dtype=np.int64),
        rank=np.arange(n),
        blank=np.zeros(n, dtype=bool),
        listed=np.zeros(n, dtype=bool),
        source=np.full(n, -1),
    )
    grouping = group_images(nodes, phash_distance, placeholder_domains=5)
    wall = time.perf_counter() - started
    after = _usage()
    return dict(
        workload="exact + perceptual grouping",
        hashes=n,
        phash_distance=phash_distance,
        removed=int((~grouping.kept).sum()),
        planted_copies=len(copies),
        planted_recall=round(float(np.mean(grouping.group[copies] == grouping.group[sources])), 4),
        wall_seconds=round(wall, 1),
        cpu_seconds=round(after["cpu"] - before["cpu"], 1),
        peak_rss_mib=round(after["peak_rss_kib"] / 1024),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capfilt.dedup.bench", description=__doc__)
    parser.add_argument("--embeddings", type=int, help="semantic dedup of N embeddings")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--clusters", type=int, default=None)
    parser.add_argument("--images", type=int, help="hash N generated JPEGs")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--groups", type=int, help="group N generated hashes")
    parser.add_argument("--phash-distance", type=int, default=4)
    args = parser.parse_args(argv)
    if not (args.embeddings or args.images or args.groups):
        parser.error("give --embeddings N, --images N or --groups N")
    if args.embeddings:
        print(json.dumps(bench_embeddings(args.embeddings, args.dim, args.eps, args.clusters)))
    if args.images:
        print(json.dumps(bench_hashing(args.images, args.workers)))
    if args.groups:
        print(json.dumps(bench_grouping(args.groups, args.phash_distance)))


if __name__ == "__main__":
    main()
