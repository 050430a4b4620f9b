"""`capfilt bench caption` of a BLIP-2 or image-text-to-text captioner (models/vlm.py).

Both sides caption the same images with the same weights, prompt, precision and number of
new tokens per caption (min = max, so a random model's early end of text cannot shorten one
side's work):

- plain: the transformers recipe, per batch: the processor on the decoded images and the
  prompt (the chat template's user turn), `generate(do_sample=True, top_p,
  num_return_sequences)`, the new tokens decoded;
- capfilt: the caption stage (`caption_shard` with a `VlmCaptioner`, or vLLM with
  `--engine vllm`), keyed nucleus sampling.

`--level e2e` starts from JPEG bytes in a Parquet shard and ends with rows written (both sides
decode the JPEGs); `--level model` starts from decoded images. The work per image is counted
once, untimed, by torch's FLOP counter over one image's captions (the model is not a BLIP, whose
FLOPs `measure.caption_flops` counts from the config).
"""

from __future__ import annotations

from pathlib import Path

from capfilt.bench.config import BenchConfig
from capfilt.bench.fixtures import random_jpegs, random_texts, write_bench_dataset
from capfilt.bench.measure import batches, decode_flags, measure_matmul_tflops, report, side
from capfilt.core.errors import CapfiltError


def is_vlm_bench(config: BenchConfig) -> bool:
    """True when `bench caption` is to measure a BLIP-2/image-text-to-text captioner."""
    from capfilt.models.tiny_vlm import TINY_VLMS

    if config.workload != "caption":
        return False
    if config.model:
        from capfilt.models.vlm import local_model_type

        model_type = local_model_type(config.model)
        return model_type is not None and model_type != "blip"
    return config.arch in TINY_VLMS


def load_vlm(config: BenchConfig, scratch: Path):
    """(captioner, label): the --model checkpoint, or a random one of --arch built here."""
    from capfilt.models.tiny_vlm import build_tiny_vlm
    from capfilt.models.vlm import VlmCaptioner

    if config.model:
        path, label = config.model, None
    else:
        path = build_tiny_vlm(config.arch, scratch / config.arch, config.seed)
        label = f"random-weights {config.arch}"
    captioner = VlmCaptioner.load(str(path), config.precision, config.device)
    if label is None:
        label = f"{captioner.source.model_id} ({captioner.source.revision})"
    return captioner, label


def bench_vlm_caption(config: BenchConfig, scratch: Path) -> dict:
    import torch

    from capfilt.images.decode import decode_image
    from capfilt.models.vlm import default_prompt
    from capfilt.stages.caption import CaptionOptions, caption_shard

    if config.level == "data":
        raise CapfiltError(
            "bench caption --level data times BLIP's image preprocessing; a VLM's processor "
            "runs inside both sides of --level e2e"
        )
    engine = config.engine or "hf"
    captioner, label = load_vlm(config, scratch)
    network, processor = captioner.network, captioner.processor
    device, dtype = captioner.device, captioner.dtype
    n, tokens = config.captions_per_image, config.new_tokens
    prompt = default_prompt(captioner.model_type)
    text = captioner.prompt_text(prompt)
    images = config.images
    e2e = config.level == "e2e"
    jpegs = random_jpegs(images, config.seed)
    ds = write_bench_dataset(scratch / "ds", jpegs, random_texts(images, 8, config.seed))
    images_table = ds.read_shard("images", 0)  # read before timing, for both sides
    keys, blobs = images_table["key"].to_pylist(), images_table["jpg"].to_pylist()
    decoded = [decode_image(b).image for b in blobs]
    lengths = dict(min_length=tokens, max_length=tokens)
    encoder_decoder = captioner.encoder_decoder  # its ids are the new tokens only

    def plain_captions(pil: list) -> list[str]:
        inputs = processor(images=pil, text=[text] * len(pil), padding=True, return_tensors="pt")
        inputs = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            ids = network.generate(
                **inputs,
                do_sample=True,
                top_p=config.top_p,
                num_return_sequences=n,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
            )
        new = ids if encoder_decoder else ids[:, inputs["input_ids"].shape[1] :]
        return processor.batch_decode(new, skip_special_tokens=True)

    def plain():
        from capfilt.core.parquet import CAPTIONS_SCHEMA, rows_to_table

        rows = []
        for start, stop in batches(images, config.batch_size):
            pil = [decode_image(b).image for b in blobs[start:stop]] if e2e else decoded[start:stop]
            for i, caption in enumerate(plain_captions(pil)):
                rows.append(
                    dict(
                        key=keys[start + i // n],
                        caption_id=i % n,
                        text=caption.strip(),
                        model="plain",
                        status="success",
                        error_message=None,
                    )
                )
        if e2e:
            ds.write_shard("captions", 0, rows_to_table(rows, CAPTIONS_SCHEMA))

    flops = _caption_flops(captioner, decoded[0], prompt, n, tokens)  # on transformers
    if engine == "vllm":
        from capfilt.models.vlm import VllmCaptioner

        captioner = VllmCaptioner.load(captioner.source, captioner.model_type, config.precision)
    stage_config = CaptionOptions(
        model=label,
        num_captions=n,
        top_p=config.top_p,
        repetition_penalty=1.0,
        prompt=prompt,
        batch_size=config.batch_size,
        num_workers=config.workers,  # None: the stage's default
        threads=config.threads,  # both sides on the same cores
        engine=engine,
        fast_decode=config.fast_decode,
        **lengths,
    )

    def capfilt():
        if e2e:
            ds.write_shard("captions", 0, caption_shard(captioner, images_table, stage_config))
            return
        seeds = list(range(n * images))
        for start, stop in batches(images, config.batch_size):
            captioner.generate_captions(
                decoded[start:stop],
                prompt=prompt,
                num_captions=n,
                row_seeds=seeds[start * n : stop * n],
                top_p=config.top_p,
                repetition_penalty=1.0,
                **lengths,
            )

    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    hf = side(device, plain, config.repeats, images, 0, flops, bound)
    ours = side(device, capfilt, config.repeats, images, 0, flops, bound)
    prompt_tokens = len(processor(images=[decoded[0]], text=[text])["input_ids"][0])
    family = captioner.model_type
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
            family=family,
            engine=engine,
            prompt=prompt,
            prompt_tokens=prompt_tokens,  # image tokens included
            new_tokens=tokens,
            captions_per_image=n,
            **decode_flags(config),
        ),
    )


def _caption_flops(captioner, image, prompt: str, captions: int, tokens: int) -> float:
    """FLOPs to caption one image (`captions` captions of `tokens` new tokens), counted by
    torch's FLOP counter on the transformers path."""
    from torch.utils.flop_counter import FlopCounterMode

    network = captioner.network
    trainable = [p for p in network.parameters() if p.requires_grad]
    # The counter hooks the gradients of module outputs that require one (BLIP-2's query
    # tokens are a parameter used as an input): none here.
    network.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            captioner.generate_ids(
                [image],
                prompt=prompt,
                num_captions=captions,
                row_seeds=list(range(captions)),
                min_length=tokens,
                max_length=tokens,
            )
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return float(counter.get_total_flops())
