"""capfilt's GPU benchmark suite: every figure of the speed issues in one process, one run.

    python -m capfilt.bench_suite --out bench-out               # on a machine with a GPU
    python -m capfilt.bench_suite --out /tmp/b --dry-run        # the same plumbing, tiny, CPU
    python -m capfilt.bench_suite --only caption-base-e2e filter-large-e2e

Each step is a `capfilt bench` configuration (random weights of the released BLIP shapes, so
no hub access is needed) or a check; results are appended to OUT/bench.jsonl as they come, so
a lease that ends early still returns what ran. Steps run in order of importance and are
skipped once `--budget` seconds have passed. A step that fails is recorded and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

# (name, `capfilt bench` options). e2e = JPEG bytes in Parquet -> rows written.
# In order of importance: end to end first (the targets), then model level,
# pretraining, compile variants. `workers` is left to the default (the CPU cores less 2).
SUITE = [
    ("parity", None),  # None: a check of this file (`main`), not a bench
    (
        "caption-base-e2e",
        dict(
            workload="caption",
            arch="base",
            images=4096,
            batch_size=512,
            cuda_graphs=True,
        ),
    ),
    (
        "caption-large-e2e",
        dict(
            workload="caption",
            arch="large",
            images=2048,
            batch_size=512,
            cuda_graphs=True,
        ),
    ),
    (
        "filter-large-e2e",
        dict(
            workload="filter",
            arch="large",
            images=1536,
            batch_size=512,
            captions_per_image=1,
        ),
    ),
    (
        # The input path alone for 0, 1, 2, 4, 8, 16 decoding workers: does it scale (≥ 0.8 N)?
        "decode-scaling-base",
        dict(
            workload="caption",
            arch="base",
            level="data",
            images=2048,
            batch_size=256,
            workers=16,
        ),
    ),
    (
        "caption-base-e2e-gpu-decode",
        dict(
            workload="caption",
            arch="base",
            images=4096,
            batch_size=512,
            cuda_graphs=True,
            gpu_decode=True,
        ),
    ),
    (
        "filter-large-e2e-gpu-decode",
        dict(
            workload="filter",
            arch="large",
            images=1536,
            batch_size=512,
            captions_per_image=1,
            gpu_decode=True,
        ),
    ),
    (
        "caption-base-model",
        dict(
            workload="caption",
            arch="base",
            level="model",
            images=2048,
            batch_size=512,
            cuda_graphs=True,
        ),
    ),
    (
        "caption-large-model",
        dict(
            workload="caption",
            arch="large",
            level="model",
            images=1024,
            batch_size=512,
            cuda_graphs=True,
        ),
    ),
    (
        "filter-large-model",
        dict(
            workload="filter",
            arch="large",
            level="model",
            images=2048,
            batch_size=512,
            captions_per_image=1,
        ),
    ),
    ("pretrain-syncs", None),  # host syncs inside a MED training step (should be 0)
    (
        "pretrain-base-b256",
        dict(workload="pretrain", arch="base", images=2048, batch_size=256, text_tokens=30),
    ),
    (
        "pretrain-base-b256-compile",
        dict(
            workload="pretrain",
            arch="base",
            images=4096,
            batch_size=256,
            text_tokens=30,
            compile=True,
        ),
    ),
    (
        "pretrain-base-b128",
        dict(workload="pretrain", arch="base", images=2048, batch_size=128, text_tokens=30),
    ),
    ("profile-caption", None),
    ("decode-only", None),
    (
        "caption-base-model-compile",
        dict(
            workload="caption",
            arch="base",
            level="model",
            images=2048,
            batch_size=512,
            compile=True,
        ),
    ),
    (
        "caption-base-model-nographs",
        dict(workload="caption", arch="base", level="model", images=2048, batch_size=512),
    ),
    (
        "filter-large-model-itm-only",
        dict(
            workload="filter",
            arch="large",
            level="model",
            images=2048,
            batch_size=512,
            captions_per_image=1,
            itc=False,
        ),
    ),
    (
        "caption-base-model-3caps",
        dict(
            workload="caption",
            arch="base",
            level="model",
            images=1024,
            batch_size=256,
            captions_per_image=3,
            cuda_graphs=True,
        ),
    ),
    (
        "pretrain-base-b64",
        dict(workload="pretrain", arch="base", images=1024, batch_size=64, text_tokens=30),
    ),
]


def log(out: Path, record: dict) -> None:
    with open(out / "bench.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def environment(out: Path) -> None:
    import torch
    import transformers

    info = dict(
        step="environment",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        cpus=os.cpu_count(),
    )
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    log(out, info)


def parity(out: Path, arch: str, device_name: str) -> None:
    """Greedy ids and ITM/ITC of the fast path against plain transformers, on this device."""
    import torch

    from capfilt.bench import random_blip
    from capfilt.models.fast import FastCaptioner, FastItm

    device = torch.device(device_name)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        net, _ = random_blip("captioner", arch)
        net.to(device, dtype)
        size = net.config.vision_config.image_size
        pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(device, dtype)
        with torch.inference_mode():
            ref = net.generate(pixel_values=pixels, max_length=20, min_length=5, do_sample=False)
        for graphs in (False, True):
            got = FastCaptioner(net, cuda_graphs=graphs).generate(
                pixels, max_length=20, min_length=5, do_sample=False
            )
            width = min(ref.shape[1], got.shape[1])
            log(
                out,
                dict(
                    step="parity-caption",
                    dtype=str(dtype),
                    cuda_graphs=graphs,
                    identical=ref.shape == got.shape and bool((ref == got).all()),
                    token_agreement=(ref[:, :width] == got[:, :width]).float().mean().item(),
                ),
            )
        del net
        filt, proc = random_blip("filter", arch)
        filt.to(device, dtype)
        enc = proc.tokenizer(
            ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11"], padding=True, return_tensors="pt"
        ).to(device)
        index = torch.tensor([0, 0, 1, 1], device=device)
        with torch.inference_mode():
            kwargs = dict(
                input_ids=enc.input_ids,
                pixel_values=pixels[:2][index],
                attention_mask=enc.attention_mask,
            )
            itm_ref = filt(**kwargs).itm_score.float().softmax(-1)[:, 1]
            itc_ref = filt(**kwargs, use_itm_head=False).itm_score.float().diagonal()
        fast = FastItm(filt)
        embeds = fast.encode_images(pixels[:2])
        itm = fast.itm(embeds, index, enc.input_ids, enc.attention_mask)
        itc = fast.itc(embeds, index, enc.input_ids, enc.attention_mask)
        log(
            out,
            dict(
                step="parity-filter",
                dtype=str(dtype),
                itm_max_abs_diff=(itm_ref - itm).abs().max().item(),
                itc_max_abs_diff=(itc_ref - itc).abs().max().item(),
            ),
        )
        del filt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def decode_throughput(out: Path, workers: int, images: int) -> None:
    """Images/s of JPEG decoding + BLIP preprocessing alone in DataLoader workers."""
    from capfilt.bench import random_jpegs
    from capfilt.images.batches import ShardImages, image_batches
    from capfilt.models.tiny import image_processor

    jpegs = random_jpegs(images, 0)
    rows = ShardImages([str(i) for i in range(images)], jpegs)
    processor = image_processor(384)
    for count in sorted({0, workers}):
        start = time.perf_counter()
        seen = sum(len(b) for b in image_batches(rows, processor, 512, num_workers=count))
        seconds = time.perf_counter() - start
        log(
            out,
            dict(
                step="decode-only",
                workers=count,
                images=seen,
                images_per_s=seen / seconds,
                processor=type(processor).__name__,
            ),
        )


def profile_caption(out: Path, arch: str, device_name: str, batch: int) -> None:
    """Where a captioning batch's time goes: vision encoder vs. the decoding loop, and the
    top GPU kernels of the loop (torch.profiler), written to OUT/profile-caption.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from capfilt.bench import random_blip
    from capfilt.models.fast import FastCaptioner

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net, _ = random_blip("captioner", arch)
    net.to(device, dtype)
    size = net.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    fast = FastCaptioner(net)
    lengths = dict(max_length=21, min_length=21, do_sample=True, top_p=0.9)

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    embeds = fast.encode_images(pixels)
    vision = timed(lambda: fast.encode_images(pixels))
    decode = timed(lambda: fast.generate(image_embeds=embeds, **lengths))
    log(
        out,
        dict(
            step="profile-caption",
            arch=arch,
            batch=batch,
            vision_ms=1e3 * vision,
            decode_ms=1e3 * decode,
            images_per_s=batch / (vision + decode),
        ),
    )
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fast.generate(image_embeds=embeds, **lengths)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (out / "profile-caption.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))


def pretrain_syncs(out: Path, arch: str, device_name: str, batch: int) -> None:
    """Host synchronisations inside MED training steps (forward, backward, AdamW), counted by
    CUDA's sync debug mode; the training loop itself reads the losses a step late."""
    import warnings

    import torch

    from capfilt.bench.fixtures import random_pretrain_batch, synthetic_bert_tokenizer
    from capfilt.models.med import MED, med_config

    device = torch.device(device_name)
    if device.type != "cuda":
        log(out, dict(step="pretrain-syncs", syncs=None, why="counted on CUDA only"))
        return
    tokenizer = synthetic_bert_tokenizer()
    config = med_config(arch, tokenizer, queue_size=batch * 4)
    med = MED(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], fused=True)
    pixels, ids, mask = random_pretrain_batch(batch, config.image_size, 30, 0, device)
    mask[::2, 20:] = 0  # padding, so the masks are not all ones

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(med(pixels, ids, mask).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations and autotuning may sync once
    torch.cuda.synchronize()
    steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchron" in str(w.message)]
    log(
        out,
        dict(step="pretrain-syncs", steps=steps, syncs=len(syncs), first=sorted(set(syncs))[:5]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later steps skip")
    parser.add_argument("--only", nargs="*", help="run only these step names")
    parser.add_argument("--dry-run", action="store_true", help="tiny arch, few images, CPU")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    import torch

    from capfilt.bench import BenchConfig, run_bench

    environment(args.out)
    cuda = torch.cuda.is_available() and not args.dry_run
    arch, device = ("tiny", "cpu") if args.dry_run else ("base", "cuda" if cuda else "cpu")
    checks = {
        "parity": lambda: parity(args.out, arch, device),
        "profile-caption": lambda: profile_caption(
            args.out, arch, device, 4 if args.dry_run else 512
        ),
        "pretrain-syncs": lambda: pretrain_syncs(args.out, arch, device, 4 if args.dry_run else 64),
        "decode-only": lambda: decode_throughput(
            args.out, 2 if args.dry_run else 14, 16 if args.dry_run else 2048
        ),
    }
    for name, options in SUITE:
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - began
        if elapsed > args.budget:
            log(args.out, dict(step=name, skipped=f"budget spent ({elapsed:.0f} s)"))
            continue
        start = time.perf_counter()
        try:
            if options is None:
                checks[name]()
            else:
                if args.dry_run:
                    options = dict(
                        options,
                        arch="tiny",
                        images=8,
                        batch_size=4,
                        device="cpu",
                        workers=min(options.get("workers", 0), 2),
                    )
                result = run_bench(BenchConfig(**options))
                log(args.out, dict(step=name, options=options, result=result))
        except Exception as error:  # noqa: BLE001 - one failed step must not lose the others
            log(args.out, dict(step=name, error=repr(error), traceback=traceback.format_exc()))
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"# {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"# total {time.perf_counter() - began:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
