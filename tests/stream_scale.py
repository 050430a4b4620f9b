"""Does pretraining's memory or time to the first step grow with the dataset? (A benchmark of
the repository, not a test: it writes some 200,000 generated JPEGs and is kept out of CI.)

    python tests/stream_scale.py --work /tmp/scale                 # 10,000 and 200,000 images
    python tests/stream_scale.py --work /tmp/scale --sizes 1000 5000 --steps 5

For each size it writes a dataset in capfilt's layout (images/ shards of 10,000 rows, like
img2dataset's, of distinct generated JPEGs), then runs

    capfilt pretrain DS --out RUN --preset tiny --max-steps STEPS --num-workers W

as a fresh process and samples, every 50 ms, the proportional set size (PSS: shared pages
divided among the processes sharing them) of that process and its DataLoader workers, and
the main process's own peak RSS (VmHWM). Time to the first step is from the start of the
process to the first line of RUN/log.jsonl. Results are printed and appended to
WORK/scale.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARD_ROWS = 10_000


def write_dataset(root: Path, images: int, side: int, seed: int = 0) -> None:
    """images/ shards of distinct JPEGs (random colour blocks, blurred; about 6.5 KB at 128 px)
    with made-up captions."""
    if len(list((root / "images").glob("*.parquet"))) == -(-images // SHARD_ROWS):
        return  # written by an earlier run
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from capfilt.core.layout import Dataset

    ds = Dataset(str(root))
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "small", "large", "a", "on", "the"]
    for shard, start in enumerate(range(0, images, SHARD_ROWS)):
        count = min(SHARD_ROWS, images - start)
        keys = [f"{start + i:09d}" for i in range(count)]
        jpegs = []
        for _ in range(count):
            coarse = rng.integers(0, 256, size=(side // 4, side // 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(
                buf, format="JPEG", quality=85
            )
            jpegs.append(buf.getvalue())
        captions = [" ".join(rng.choice(words, size=6)) for _ in range(count)]
        table = pa.table(
            {
                "key": keys,
                "url": [f"http://example.invalid/{k}.jpg" for k in keys],
                "caption": captions,
                "status": ["success"] * count,
                "error_message": pa.nulls(count, pa.string()),
                "width": [side] * count,
                "height": [side] * count,
                "jpg": jpegs,
            }
        )
        ds.write_shard("images", shard, table)


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(dataset: Path, run: Path, steps: int, workers: int, batch: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "capfilt",
        "pretrain",
        str(dataset),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--num-workers",
        str(workers),
        "--save-every",
        str(steps),
        "--overwrite",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = run / "log.jsonl"
    if log.exists():
        log.unlink()
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_pss = peak_hwm = 0
    first_step = None
    while process.poll() is None:
        pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(process.pid))
        peak_pss = max(peak_pss, pss)
        peak_hwm = max(peak_hwm, _kib(f"/proc/{process.pid}/status", "VmHWM:"))
        if first_step is None and log.exists() and log.stat().st_size:
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    output = process.stdout.read().decode(errors="replace")
    if process.returncode:
        raise SystemExit(f"pretrain failed:\n{output[-3000:]}")
    return dict(
        peak_pss_mib=peak_pss / 1024,
        main_peak_rss_mib=peak_hwm / 1024,
        first_step_s=first_step,
        total_s=total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for datasets and runs.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=128, help="Side of the JPEGs, px.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per size; all are kept.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        dataset = args.work / f"ds-{size}"
        begun = time.perf_counter()
        write_dataset(dataset, size, args.image_side)
        on_disk = sum(f.stat().st_size for f in (dataset / "images").glob("*.parquet"))
        took = time.perf_counter() - begun
        print(f"{size} images: {on_disk / 2**20:.0f} MiB of shards ({took:.0f} s)")
        for repeat in range(args.repeats):
            figures = measure(
                dataset, args.work / f"run-{size}", args.steps, args.workers, args.batch_size
            )
            record = dict(
                images=size,
                shards_mib=on_disk / 2**20,
                steps=args.steps,
                workers=args.workers,
                batch_size=args.batch_size,
                repeat=repeat,
                cpus=os.cpu_count(),
                **figures,
            )
            results.append(record)
            with open(args.work / "scale.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"  peak PSS {figures['peak_pss_mib']:.0f} MiB (main process RSS "
                f"{figures['main_peak_rss_mib']:.0f} MiB), first step after "
                f"{figures['first_step_s']:.1f} s, {args.steps} steps in {figures['total_s']:.1f} s"
            )
    if len(args.sizes) > 1:
        small = min(results, key=lambda r: r["images"])
        for r in results:
            if r["images"] != small["images"]:
                print(
                    f"{r['images']} vs {small['images']} images: PSS "
                    f"{r['peak_pss_mib'] / small['peak_pss_mib']:.2f}x, main RSS "
                    f"{r['main_peak_rss_mib'] / small['main_peak_rss_mib']:.2f}x, first step "
                    f"{r['first_step_s'] / small['first_step_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
