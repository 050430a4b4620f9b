"""`capfilt bench`: a stage's throughput here, capfilt's path against the plain Hugging Face recipe.

Both sides run in one process on the same model weights, the same images and the same
precision, one after the other, so their ratio holds on a noisy machine:

- caption — plain: `BlipProcessor` + `BlipForConditionalGeneration.generate` (nucleus
  sampling, `num_return_sequences`), batched; capfilt: the fast path (`models/fast.py`).
- filter — plain: `BlipForImageTextRetrieval` forward on each batch of (image, caption) pairs
  (ITM, and with ITC a second forward with `use_itm_head=False`); capfilt: the fast path.
- pretrain — one MED training step (ITC + ITM + LM, AdamW), images/s and MFU; no plain
  counterpart exists.

Levels: `e2e` (default) starts from JPEG bytes in a Parquet shard and ends with rows written
(capfilt runs its stage functions, `caption_shard`/`score_shard`, with the fast model); `model`
starts from pixel tensors. Work per image is counted analytically from the config (vision
encoder + text encoder/decoder per token) to give the achieved TFLOP/s and the fraction of the
FLOP bound, the bound being a large matmul measured on the same device and precision."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from capfilt.bench.config import ARCH_SHAPES, BenchConfig
from capfilt.bench.fixtures import (
    load_models,
    random_jpegs,
    random_pixels,
    random_pretrain_batch,
    random_texts,
    synthetic_bert_tokenizer,
    write_bench_dataset,
)
from capfilt.bench.measure import (
    SideResult,
    batches,
    caption_flops,
    decode_flags,
    filter_flops,
    measure_matmul_tflops,
    pretrain_flops,
    report,
    side,
)
from capfilt.core.errors import CapfiltError


def bench_caption(config: BenchConfig, scratch: Path) -> dict:
    import torch

    network, processor, label, device, dtype = load_models(config, "captioner")
    tokenizer = processor.tokenizer
    n, tokens = config.captions_per_image, config.new_tokens
    e2e = config.level == "e2e"
    prompt = "a picture of " if e2e else ""
    prompt_len = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # min length = max length: every caption has exactly `tokens` new tokens on both sides, so
    # a random model's early [SEP] cannot make one side's work smaller.
    lengths = dict(max_length=prompt_len + tokens, min_length=prompt_len + tokens)
    sampling = dict(do_sample=True, top_p=config.top_p, num_return_sequences=n, **lengths)
    flops = caption_flops(network.config, n, prompt_len, tokens)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    images = config.images
    fast_options = dict(cuda_graphs=config.cuda_graphs, compile=config.compile)

    if e2e:
        from capfilt.core.parquet import CAPTIONS_SCHEMA, rows_to_table
        from capfilt.images.decode import decode_image
        from capfilt.models.blip import Captioner, ModelSource
        from capfilt.stages.caption import CaptionOptions, caption_shard

        jpegs = random_jpegs(images, config.seed)
        ds = write_bench_dataset(scratch / "ds", jpegs, random_texts(images, 8, config.seed))
        images_table = ds.read_shard("images", 0)  # read before timing, for both sides

        def plain():
            rows = []
            table = images_table
            keys, blobs = table["key"].to_pylist(), table["jpg"].to_pylist()
            for start, stop in batches(len(keys), config.batch_size):
                pil = [decode_image(b).image for b in blobs[start:stop]]
                inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
                with torch.inference_mode():
                    ids = network.generate(
                        pixel_values=inputs.pixel_values.to(device, dtype),
                        input_ids=inputs.input_ids.to(device),
                        repetition_penalty=1.1,
                        **sampling,
                    )
                texts = tokenizer.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
                for i, text in enumerate(texts):
                    rows.append(
                        dict(
                            key=keys[start + i // n],
                            caption_id=i % n,
                            text=text,
                            model="plain",
                            status="success",
                            error_message=None,
                        )
                    )
            ds.write_shard("captions", 0, rows_to_table(rows, CAPTIONS_SCHEMA))

        source = ModelSource(label, Path("."), "bench")
        captioner = Captioner(
            network, processor, source, device, dtype, engine="fast", fast_options=fast_options
        )
        stage_config = CaptionOptions(
            model=label,
            num_captions=n,
            top_p=config.top_p,
            repetition_penalty=1.1,
            prompt=prompt,
            batch_size=config.batch_size,
            num_workers=config.workers,  # None: the stage's default
            fast_decode=config.fast_decode,
            gpu_decode=config.gpu_decode,
            **lengths,
        )

        def capfilt():
            table = caption_shard(captioner, images_table, stage_config)
            ds.write_shard("captions", 0, table)

    else:
        from capfilt.models.fast import FastCaptioner, OomBackoff

        pixels = random_pixels(network.config, images, config.seed, device, dtype)
        fast = FastCaptioner(network, **fast_options)
        backoff = OomBackoff(config.batch_size)
        generator = torch.Generator(device=device).manual_seed(config.seed)

        def plain():
            for start, stop in batches(images, config.batch_size):
                with torch.inference_mode():
                    network.generate(pixel_values=pixels[start:stop], **sampling)

        def capfilt():
            backoff.map(
                lambda start, stop: fast.generate(
                    pixels[start:stop],
                    num_captions=n,
                    top_p=config.top_p,
                    generator=generator,
                    **lengths,
                ),
                images,
            )

    hf = side(device, plain, config.repeats, images, 0, flops, bound)
    ours = side(device, capfilt, config.repeats, images, 0, flops, bound)
    return report(
        config,
        label,
        device,
        dtype,
        flops,
        bound,
        hf,
        ours,
        extra=dict(
            prompt_tokens=prompt_len,
            new_tokens=tokens,
            captions_per_image=n,
            **fast_options,
            **decode_flags(config),
        ),
    )


def bench_filter(config: BenchConfig, scratch: Path) -> dict:
    import torch

    network, processor, label, device, dtype = load_models(config, "filter")
    tokenizer = processor.tokenizer
    synthetic_n = config.captions_per_image
    texts_per_image = 1 + synthetic_n
    images = config.images
    words = config.text_tokens - 2
    web = random_texts(images, words, config.seed)
    synthetic = [random_texts(synthetic_n, words, config.seed * 7919 + i) for i in range(images)]
    flops = filter_flops(network.config, texts_per_image, config.text_tokens, config.itc)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    pairs = images * texts_per_image
    e2e = config.level == "e2e"

    def plain_scores(pixel_values, index, texts):
        encoded = tokenizer(
            texts, padding="longest", truncation=True, max_length=35, return_tensors="pt"
        )
        ids = encoded.input_ids.to(device)
        mask = encoded.attention_mask.to(device)
        pair_pixels = pixel_values[index]
        with torch.inference_mode():
            itm = network(input_ids=ids, pixel_values=pair_pixels, attention_mask=mask)
            itm = itm.itm_score.float().softmax(dim=-1)[:, 1]
            itc = None
            if config.itc:
                sim = network(
                    input_ids=ids, pixel_values=pair_pixels, attention_mask=mask, use_itm_head=False
                ).itm_score
                itc = sim.diagonal().float()
        return itm.cpu(), None if itc is None else itc.cpu()

    if e2e:
        from capfilt.core.parquet import SCORES_SCHEMA, rows_to_table
        from capfilt.images.decode import decode_image
        from capfilt.models.blip import ItmScorer, ModelSource
        from capfilt.stages.filter import FilterOptions, score_shard

        ds = write_bench_dataset(scratch / "ds", random_jpegs(images, config.seed), web, synthetic)
        images_table = ds.read_shard("images", 0)  # read before timing, for both sides
        captions_table = ds.read_shard("captions", 0)

        def plain():
            table = images_table
            captions = captions_table.to_pylist()
            by_key: dict[str, list[str]] = {}
            for row in captions:
                by_key.setdefault(row["key"], []).append(row["text"])
            keys, blobs = table["key"].to_pylist(), table["jpg"].to_pylist()
            web_texts = table["caption"].to_pylist()
            rows = []
            for start, stop in batches(len(keys), config.batch_size):
                pil = [decode_image(b).image for b in blobs[start:stop]]
                pixel_values = processor(images=pil, return_tensors="pt").pixel_values
                pixel_values = pixel_values.to(device, dtype)
                index, texts, meta = [], [], []
                for i in range(start, stop):
                    for text_id, text in enumerate([web_texts[i], *by_key.get(keys[i], [])]):
                        index.append(i - start)
                        texts.append(text)
                        meta.append((keys[i], text_id, "web" if text_id == 0 else "synthetic"))
                itm, itc = plain_scores(pixel_values, torch.tensor(index, device=device), texts)
                for j, (key, text_id, source) in enumerate(meta):
                    rows.append(
                        dict(
                            key=key,
                            text_id=text_id,
                            source=source,
                            text=texts[j],
                            itm_score=float(itm[j]),
                            itc_score=None if itc is None else float(itc[j]),
                            model="plain",
                        )
                    )
            ds.write_shard("scores", 0, rows_to_table(rows, SCORES_SCHEMA))

        source = ModelSource(label, Path("."), "bench")
        scorer = ItmScorer(
            network, processor, source, device, dtype, itm_token="cls", engine="fast"
        )
        stage_config = FilterOptions(
            threshold=0.5,
            model=label,
            itm_token="cls",
            batch_size=config.batch_size,
            num_workers=config.workers,  # None: the stage's default
            fast_decode=config.fast_decode,
            gpu_decode=config.gpu_decode,
        )

        def capfilt():
            table = score_shard(scorer, images_table, captions_table, stage_config)
            ds.write_shard("scores", 0, table)

    else:
        from capfilt.models.fast import FastItm, OomBackoff

        pixels = random_pixels(network.config, images, config.seed, device, dtype)
        texts = [t for i in range(images) for t in [web[i], *synthetic[i]]]
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        all_ids, all_mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
        fast = FastItm(network)
        backoff = OomBackoff(config.batch_size)

        def plain():
            for start, stop in batches(images, config.batch_size):
                index = torch.arange(stop - start, device=device).repeat_interleave(texts_per_image)
                plain_scores(
                    pixels[start:stop],
                    index,
                    texts[start * texts_per_image : stop * texts_per_image],
                )

        def fast_batch(start, stop):
            rows = slice(start * texts_per_image, stop * texts_per_image)
            index = torch.arange(stop - start, device=device).repeat_interleave(texts_per_image)
            embeds = fast.encode_images(pixels[start:stop])
            itm = fast.itm(embeds, index, all_ids[rows], all_mask[rows]).cpu()
            if config.itc:
                itc = fast.itc(embeds, index, all_ids[rows], all_mask[rows]).cpu()
                return itm, itc
            return itm

        def capfilt():
            backoff.map(fast_batch, images)

    hf = side(device, plain, config.repeats, images, pairs, flops, bound)
    ours = side(device, capfilt, config.repeats, images, pairs, flops, bound)
    return report(
        config,
        label,
        device,
        dtype,
        flops,
        bound,
        hf,
        ours,
        extra=dict(
            texts_per_image=texts_per_image,
            text_tokens=config.text_tokens,
            itc=config.itc,
            **decode_flags(config),
        ),
    )


def bench_pretrain(config: BenchConfig, scratch: Path) -> dict:
    """Images/s and MFU of MED training steps (ITC + ITM + LM) on random data.

    plain: transformers' eager attention and the default (for-each) AdamW; capfilt: SDPA in
    every attention module and, on GPU, the fused AdamW. Same weights, data and autocast.
    """
    import torch

    from capfilt.models.blip import resolve_device, resolve_dtype
    from capfilt.models.med import MED, compile_layers, med_config

    if config.model:
        raise CapfiltError("bench pretrain builds a MED from --arch; --model is not used here")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    tokenizer = synthetic_bert_tokenizer()
    med_cfg = med_config(config.arch, tokenizer, queue_size=max(config.batch_size * 4, 64))
    size = med_cfg.image_size
    batch = config.batch_size
    pixels, ids, mask = random_pretrain_batch(batch, size, config.text_tokens, config.seed, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    steps = max(1, config.images // batch)
    if config.level == "data":  # --images sizes the dataset; a few steps give the step rate
        steps = min(steps, 4)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    flops = pretrain_flops(med_cfg.blip_config(), config.text_tokens)
    images = steps * batch

    def train_side(attention: str, fused: bool, compile: bool = False) -> SideResult:
        torch.manual_seed(config.seed)
        med = MED(med_cfg, attention=attention).to(device).train()
        if compile:
            compile_layers(med)
        params = [p for p in med.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)

        def run():
            for _ in range(steps):
                with autocast:
                    loss = sum(med(pixels, ids, mask).values())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return side(device, run, config.repeats, images, 0, flops, bound)

    if config.level == "data":
        model_side = train_side("sdpa", fused=device.type == "cuda", compile=config.compile)
        return _bench_pretrain_data(config, scratch, med_cfg, tokenizer, model_side)
    hf = train_side("eager", fused=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the eager side's model and optimizer are gone
    ours = train_side("sdpa", fused=device.type == "cuda", compile=config.compile)
    result = report(
        config,
        f"random-weights MED {config.arch} ({size} px)",
        device,
        dtype,
        flops,
        bound,
        hf,
        ours,
        extra=dict(text_tokens=config.text_tokens, compile=config.compile),
        level="model: MED training step (forward + backward + AdamW) on random tensors",
        images=images,
    )
    # MFU: achieved model FLOP/s over the data sheet's dense peak where the chip is known,
    # else over the measured matmul bound.
    spec = result["spec_peak_tflops"]
    result["mfu"] = (
        (ours.tflops / spec if spec else ours.fraction_of_bound) if ours.tflops else None
    )
    return result


def _worker_counts(config: BenchConfig) -> list[int]:
    """0 (decoding in the main process), then 1, 2, 4, ... up to --workers (default: CPUs,
    and at least 2, so that the scaling from one worker to two is measured)."""
    import os

    most = config.workers if config.workers is not None else max(2, min(os.cpu_count() or 1, 16))
    counts, n = [0], 1
    while n <= most:
        counts.append(n)
        n *= 2
    if most not in counts:
        counts.append(most)
    return counts


def _input_rates(config: BenchConfig, loader, size) -> list[dict]:
    """For each worker count: images/s of iterating `loader(workers)` after its first batch
    (the best of --repeats), the time to that first batch, and the rate per worker."""
    import time

    rows = []
    for workers in _worker_counts(config):
        best = None
        for _ in range(config.repeats):
            batches = loader(workers)
            start = time.perf_counter()
            first, images = None, 0
            for batch in batches:
                if first is None:
                    first = time.perf_counter() - start
                    after_first = time.perf_counter()
                else:
                    images += size(batch)
            steady = time.perf_counter() - after_first
            del batches  # its workers stop
            if best is None or steady < best["seconds"]:
                best = dict(
                    workers=workers,
                    seconds=steady,
                    images=images,
                    images_per_s=images / steady if steady else None,
                    first_batch_s=first,
                )
        best["images_per_s_per_worker"] = (
            best["images_per_s"] / workers if workers and best["images_per_s"] else None
        )
        rows.append(best)
    return rows


def _bench_pretrain_data(config: BenchConfig, scratch: Path, med_cfg, tokenizer, model_side):
    """Images/s of pretraining's input pipeline alone (the plan's stream of a dataset of
    256 px JPEGs, decoded, cropped, flipped and tokenized in DataLoader workers) for each
    worker count, against the training step of the model (`model_side`)."""
    from capfilt.training.config import TEXT_TOKENS
    from capfilt.training.pairs import DecodeBatch
    from capfilt.training.stream import (
        EpochBatches,
        Picking,
        batches_per_epoch,
        build_plan,
        training_loader,
    )

    root = scratch / "ds"
    jpegs = random_jpegs(config.images, config.seed)
    write_bench_dataset(root, jpegs, random_texts(config.images, 12, config.seed), shard_size=500)
    plan, sources = build_plan((str(root),), (1.0,), Picking("all", 30, seed=config.seed))
    batches = batches_per_epoch(plan, config.seed, 0, 1, config.batch_size)
    decoder = DecodeBatch(tokenizer, TEXT_TOKENS["pretrain"], med_cfg.image_size)

    def loader(workers: int):
        sampler = EpochBatches(plan, sources, config.seed, 0, 1, config.batch_size, 4096)
        sampler.set_epoch(0, batches)
        return training_loader(decoder, sampler, workers, config.seed)

    rows = _input_rates(config, loader, lambda batch: int(batch["pixel_values"].shape[0]))
    fastest = max(r["images_per_s"] or 0 for r in rows)
    model_rate = model_side.images_per_s
    return _data_report(
        config,
        "data: training input pipeline (shard reads, shuffle buffer, JPEG decode, "
        "random crop and flip, tokenizing) in DataLoader workers, no model",
        f"random-weights MED {config.arch} ({med_cfg.image_size} px) for the step rate",
        rows,
        model_step=asdict(model_side),
        model_images_per_s=model_rate,
        bound="model" if model_rate and fastest > model_rate else "data",
    )


def bench_stage_input(config: BenchConfig, scratch: Path) -> dict:
    """caption/filter `--level data`: the stage's input path alone (JPEG bytes of a shard to
    batches of normalised pixels, `image_batches`) for each decoding worker count; 0 is the
    stage's threads in the main process. No model runs, so the figures show how decoding
    scales with workers before any model bounds it."""
    from capfilt.images.batches import ShardImages, image_batches

    _, processor, label, _, _ = load_models(config, kind_of(config.workload))
    ds = write_bench_dataset(
        scratch / "ds",
        random_jpegs(config.images, config.seed),
        random_texts(config.images, 8, config.seed),
    )
    table = ds.read_shard("images", 0)
    rows_in = ShardImages(table["key"].to_pylist(), table["jpg"].to_pylist())

    def loader(workers: int):
        return image_batches(
            rows_in,
            processor.image_processor,
            config.batch_size,
            num_workers=workers,
            fast_decode=config.fast_decode,
        )

    rows = _input_rates(config, loader, len)
    rate = {r["workers"]: r["images_per_s"] for r in rows}
    return _data_report(
        config,
        "data: the stage's input path (JPEG bytes in a shard to batches of normalised "
        "pixels), per decoding worker count, no model",
        label,
        rows,
        scaling_1_to_2=rate[2] / rate[1] if rate.get(1) and rate.get(2) else None,
    )


def _data_report(config: BenchConfig, level: str, model: str, rows: list[dict], **extra) -> dict:
    """The result of a `--level data` bench: `_input_rates`' rows per worker count."""
    import torch

    return dict(
        workload=config.workload,
        level=level,
        model=model,
        device="cpu (data)",
        dtype="-",
        threads=torch.get_num_threads(),
        images=config.images,
        batch_size=config.batch_size,
        data=rows,
        **extra,
    )


def kind_of(workload: str) -> str:
    return {"caption": "captioner", "filter": "filter"}[workload]


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark of `config.workload`; returns the result as a JSON-ready dict."""
    import torch

    from capfilt.bench.vlm import bench_vlm_caption, is_vlm_bench

    runner = {"caption": bench_caption, "filter": bench_filter, "pretrain": bench_pretrain}
    if config.level == "data" and config.workload != "pretrain":
        runner[config.workload] = bench_stage_input
    if is_vlm_bench(config):
        runner["caption"] = bench_vlm_caption
    elif config.engine or config.arch not in ARCH_SHAPES:
        raise CapfiltError(
            "--engine and --arch blip2-tiny/llava-tiny/idefics3-tiny/paligemma-tiny are for "
            "`bench caption` of BLIP-2 or an image-text-to-text model"
        )
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as scratch:
            return runner[config.workload](config, Path(scratch))
    finally:
        torch.set_num_threads(threads)
