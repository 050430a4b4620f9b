"""The Accelerate loop of `pretrain` and `finetune`: data, schedule, checkpoints, resume.

A run folder holds:

    RUN/config.json        the resolved configuration of the run (model and training)
    RUN/tokenizer/         the tokenizer the run trains with
    RUN/log.jsonl          one line per optimizer step: losses, lr, images/s
    RUN/step-N/            accelerator.save_state(...) + metadata.json, written LAST

A checkpoint counts only once its metadata.json exists; the last `keep_last` are kept.
Re-running the same command resumes from the newest checkpoint, mid-epoch included: the
data order is a pure function of (seed, epoch), augmentation of (seed, epoch, example), and
the RNG that samples ITM's hard negatives is restored by `load_state`, so a resumed run
follows the loss trajectory of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from capfilt.errors import CapfiltError

TASKS = {"pretrain": ("itc", "itm", "lm"), "caption": ("lm",), "itm": ("itc", "itm")}
SOURCES = ("all", "web", "synthetic")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# BLIP's image normalisation (the CLIP mean and std), as in its released processors.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")
METADATA = "metadata.json"
# Options that fix the data order: a resumed run must use the same ones.
RESUME_KEYS = ("task", "datasets", "source", "batch_size", "grad_accum", "seed")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one `pretrain` or `finetune` run (defaults follow BLIP's pretraining)."""

    datasets: tuple[str, ...]
    out: str
    task: str = "pretrain"  # pretrain (ITC+ITM+LM) | caption (LM) | itm (ITC+ITM)
    preset: str = "base"
    init: tuple[str, ...] = ()
    tokenizer: str | None = None
    vocab_size: int = 30522  # of a WordPiece trained from scratch
    source: str = "all"
    batch_size: int = 32  # per process
    grad_accum: int = 1
    epochs: int = 20
    max_steps: int | None = None
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000
    weight_decay: float = 0.05
    max_grad_norm: float | None = None
    max_words: int = 30
    prompt: str = "a picture of "  # the captioner's prompt (task caption)
    flip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    queue_size: int | None = None
    alpha: float | None = None
    precision: str = "auto"
    compile: bool = False  # torch.compile each transformer layer
    seed: int = 42
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    num_workers: int = 4
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise CapfiltError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.source not in SOURCES:
            raise CapfiltError(f"--source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.precision not in PRECISIONS:
            raise CapfiltError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.batch_size < 2 and self.task != "caption":
            raise CapfiltError(
                "--batch-size must be at least 2: ITM samples its negatives "
                "from the other pairs of the batch"
            )
        if self.grad_accum < 1 or self.save_every < 1 or self.keep_last < 1:
            raise CapfiltError("--grad-accum, --save-every and --keep-last must be at least 1")
        if not self.datasets:
            raise CapfiltError("give at least one DATASET folder")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise CapfiltError("--crop-scale must be two numbers 0 < min <= max <= 1")

    @property
    def losses(self) -> tuple[str, ...]:
        return TASKS[self.task]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["datasets"], data["init"] = list(self.datasets), list(self.init)
        data["crop_scale"] = list(self.crop_scale)
        return data


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    checkpoint: Path | None
    images_per_second: float
    losses: dict
    examples: int
    skipped: dict
    resumed_from: int | None = None
    is_main_process: bool = True


# ---------------------------------------------------------------------------------------------
# schedule


def learning_rate(
    step: int,
    *,
    base_lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> float:
    """Linear warm-up from `warmup_lr` to `base_lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def itc_alpha(alpha: float, epoch: int, batch_index: int, batches_per_epoch: int) -> float:
    """BLIP ramps the distillation weight in linearly over the first epoch."""
    if epoch > 0:
        return alpha
    return alpha * min(1.0, batch_index / max(1, batches_per_epoch))


# ---------------------------------------------------------------------------------------------
# data


def pre_caption(text: str, max_words: int) -> str:
    """BLIP's caption clean-up: lower case, punctuation to spaces, at most `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip().rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


@dataclass
class TrainingPairs:
    """Image-text pairs in memory: texts and the index of each one's image bytes."""

    texts: list[str]
    image_index: list[int]
    images: list[bytes]
    keys: list[str]
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def load_pairs(
    datasets: tuple[str, ...], source: str = "all", max_words: int = 30
) -> TrainingPairs:
    """The training pairs of one or more datasets: `curated/` when filtered, else web captions.

    A curated row is joined to its image on `key` (several texts may share an image). Rows
    that cannot train are counted in `skipped` by reason, never dropped silently.
    """
    from capfilt.data import decode_image
    from capfilt.layout import Dataset

    pairs = TrainingPairs([], [], [], [])
    skipped: dict[str, int] = {}
    for root in datasets:
        ds = Dataset(root)
        shards = ds.require_stage("images", "fetch or ingest images first (capfilt fetch/ingest)")
        image_of: dict[str, int] = {}  # key → index in pairs.images
        unusable: dict[str, str] = {}  # key → why its image cannot train
        for shard in shards:
            table = ds.read_shard("images", shard, columns=["key", "status", "jpg"])
            for key, status, jpg in zip(
                table.column("key").to_pylist(),
                table.column("status").to_pylist(),
                table.column("jpg").to_pylist(),
                strict=True,
            ):
                if status != "success" or not jpg:
                    unusable[key] = "image not downloaded"
                elif not decode_image(jpg).ok:
                    unusable[key] = "image not decodable"
                else:
                    image_of[key] = len(pairs.images)
                    pairs.images.append(jpg)
        if ds.has_stage("curated"):
            rows = ds.read_stage("curated", columns=["key", "source", "text"]).to_pylist()
        else:
            if source == "synthetic":
                raise CapfiltError(
                    f"{root!r} has no curated/ shards, so no synthetic captions to train on; "
                    "run `capfilt caption` and `capfilt filter` first, or pass --source web"
                )
            rows = []
            for shard in shards:
                table = ds.read_shard("images", shard, columns=["key", "caption"])
                rows += [
                    dict(key=k, source="web", text=t)
                    for k, t in zip(
                        table.column("key").to_pylist(),
                        table.column("caption").to_pylist(),
                        strict=True,
                    )
                ]
        for row in rows:
            if source != "all" and row["source"] != source:
                continue
            index = image_of.get(row["key"])
            text = pre_caption(row["text"] or "", max_words)
            reason = None
            if index is None:
                reason = unusable.get(row["key"], "no image with this key")
            elif not text:
                reason = "empty text"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            pairs.texts.append(text)
            pairs.image_index.append(index)
            pairs.keys.append(row["key"])
    pairs.skipped = skipped
    if not pairs.texts:
        raise CapfiltError(
            f"no trainable image-text pairs in {', '.join(datasets)} "
            f"(source={source}; skipped: {skipped or 'none'})"
        )
    return pairs


def random_resized_crop(
    image, rng: random.Random, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
):
    """A crop of random area (a `scale` fraction) and aspect ratio, resized to size×size."""
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # fall back to the largest centred crop
        w, h = width, height
        top, left = 0, 0
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def to_pixels(image):
    """An RGB PIL image to a normalised float tensor (3, H, W)."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class PairDataset:
    """Map-style dataset of (pixels, text); augmentation is seeded by (seed, epoch, index)."""

    def __init__(
        self,
        pairs: TrainingPairs,
        image_size: int,
        seed: int,
        augment: bool = True,
        flip: bool = True,
        crop_scale=(0.5, 1.0),
    ):
        self.pairs, self.image_size, self.seed = pairs, image_size, seed
        self.augment, self.flip, self.crop_scale = augment, flip, tuple(crop_scale)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        from capfilt.data import decode_image

        image = decode_image(self.pairs.images[self.pairs.image_index[index]]).image
        if self.augment:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            image = random_resized_crop(image, rng, self.image_size, self.crop_scale)
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_pixels(image), self.pairs.texts[index]


class Collate:
    """Stack pixels and tokenize texts (longest in batch, at most `max_length` tokens)."""

    def __init__(self, tokenizer, max_length: int, prefix: str = ""):
        self.tokenizer, self.max_length, self.prefix = tokenizer, max_length, prefix

    def __call__(self, items):
        import torch

        pixels, texts = zip(*items, strict=True)
        tokens = self.tokenizer(
            [self.prefix + t for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }


class EpochShuffle:
    """A sampler whose order is a pure function of (seed, epoch), so resume can replay it."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# ---------------------------------------------------------------------------------------------
# run folder and checkpoints


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints whose metadata.json exists, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        m = CHECKPOINT_DIR.match(entry.name)
        if m and (entry / METADATA).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(Path(run_dir))
    return found[-1][1] if found else None


def read_metadata(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / METADATA).read_text())


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: Path, step: int, metadata: dict, keep_last: int) -> Path:
    """accelerator.save_state into RUN/step-N, then metadata.json, then prune old checkpoints."""
    folder = run_dir / f"step-{step}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a killed run
    accelerator.wait_for_everyone()
    # The decoder shares most of its tensors with the encoder by design; accelerate stores each
    # once and warns about every shared name, which would bury the progress output.
    import logging

    accelerate_logger = logging.getLogger("accelerate.utils.other")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(folder))
    finally:
        accelerate_logger.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(folder / METADATA, metadata)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            # Metadata first: a kill half-way through the removal must not leave a folder
            # that still counts as a complete checkpoint.
            (old / METADATA).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        for entry in run_dir.iterdir():  # incomplete folders of earlier steps never resume
            m = CHECKPOINT_DIR.match(entry.name)
            if m and int(m.group(1)) < step and not (entry / METADATA).exists():
                shutil.rmtree(entry, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_run(run_dir: str | Path):
    """(MED model, tokenizer, metadata) of the newest checkpoint of a capfilt run folder."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from capfilt.models.med import MED, MEDConfig

    run_dir = Path(run_dir)
    checkpoint = run_dir if (run_dir / METADATA).is_file() else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CapfiltError(
            f"{str(run_dir)!r} has no complete checkpoint (step-N/{METADATA}); "
            "pass a folder written by `capfilt pretrain` or `capfilt finetune`"
        )
    metadata = read_metadata(checkpoint)
    model = MED(MEDConfig.from_dict(metadata["model_config"]))
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.parent / "tokenizer"))
    return model.eval(), tokenizer, metadata


# ---------------------------------------------------------------------------------------------
# model initialisation


def _init_kind(spec: str) -> str:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if (path / METADATA).is_file() or latest_checkpoint(path) is not None:
            return "run"
        if (path / "captioner").is_dir() or (path / "filter").is_dir():
            return "export"
    from capfilt.models.blip import resolve_checkpoint

    config_file = resolve_checkpoint(spec).path / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if "BlipForConditionalGeneration" in architectures:
        return "captioner"
    if "BlipForImageTextRetrieval" in architectures:
        return "filter"
    raise CapfiltError(
        f"--init {spec!r} is neither a capfilt run nor a BLIP captioner "
        f"(BlipForConditionalGeneration) or filter (BlipForImageTextRetrieval)"
    )


def _load_blip(spec: str, kind: str):
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.models.blip import check_checkpoint, resolve_checkpoint

    source = resolve_checkpoint(spec)
    check_checkpoint(source, kind)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    model = cls.from_pretrained(str(source.path), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    return model, tokenizer


def ensure_blip_specials(tokenizer, vocab_size: int):
    """Add [ENC] (and [DEC]) when a released BLIP tokenizer lacks them, at BLIP's ids."""
    for token in ("[DEC]", "[ENC]"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([token], special_tokens=True)
    worst = max(tokenizer.convert_tokens_to_ids(t) for t in ("[DEC]", "[ENC]"))
    if worst >= vocab_size:
        raise CapfiltError(
            f"the tokenizer's [DEC]/[ENC] ids do not fit the model's vocabulary "
            f"({vocab_size}); pass the checkpoint's own tokenizer"
        )
    return tokenizer


def init_model(config: TrainConfig, texts: list[str], accelerator):
    """(MED, tokenizer) from --init (run, export or HF BLIP checkpoints) or a fresh preset."""
    import torch

    from capfilt.models.med import MED, med_config, med_config_from_blip
    from capfilt.models.tiny import train_tokenizer

    overrides = {
        k: v
        for k, v in (("queue_size", config.queue_size), ("alpha", config.alpha))
        if v is not None
    }
    torch.manual_seed(config.seed)
    kinds = {spec: _init_kind(spec) for spec in config.init}
    runs = [s for s, k in kinds.items() if k == "run"]
    if runs:
        if len(config.init) > 1:
            raise CapfiltError("--init with a capfilt run takes that run alone")
        model, tokenizer, _ = load_run(runs[0])
        if overrides:
            state = model.state_dict()
            model = MED(replace(model.config, **overrides))
            state = {k: v for k, v in state.items() if "queue" not in k}
            model.load_state_dict(state, strict=False)
        return model, tokenizer

    blip = {}
    for spec, kind in kinds.items():
        if kind == "export":
            for sub in ("captioner", "filter"):
                if (Path(spec) / sub).is_dir():
                    blip[sub] = _load_blip(str(Path(spec) / sub), sub)
        else:
            if kind in blip:
                raise CapfiltError(f"--init names two {kind} checkpoints; give one of each kind")
            blip[kind] = _load_blip(spec, kind)
    if blip:
        first = blip.get("filter") or blip.get("captioner")
        tokenizer = first[1]
        if config.tokenizer:
            tokenizer = _load_tokenizer(config.tokenizer)
        vocab = first[0].config.text_config.vocab_size
        tokenizer = ensure_blip_specials(tokenizer, vocab)
        model = MED(med_config_from_blip(first[0].config, tokenizer, **overrides))
        model.load_blip(
            captioner=blip.get("captioner", (None,))[0], filter=blip.get("filter", (None,))[0]
        )
        return model, tokenizer

    if config.tokenizer:
        tokenizer = _load_tokenizer(config.tokenizer)
    else:
        # From scratch: a WordPiece of the training texts with the BLIP specials; the main
        # process trains it once, the others read its copy.
        folder = Path(config.out) / "tokenizer"
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                tokenizer = train_tokenizer(texts, config.vocab_size, folder)
            else:
                tokenizer = _load_tokenizer(str(folder))
    tokenizer = ensure_blip_specials(tokenizer, len(tokenizer))
    torch.manual_seed(config.seed)
    return MED(med_config(config.preset, tokenizer, **overrides)), tokenizer


def _load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise CapfiltError(
            f"cannot load tokenizer {spec!r}: {e}; pass a folder written by "
            "tokenizer.save_pretrained or a BLIP checkpoint folder"
        ) from e


def trainable_parameters(model, task: str):
    """Freeze what the task does not use (DDP requires every trained parameter to be used)."""
    if task == "pretrain":
        used = [
            model.vision_model,
            model.text_encoder,
            model.text_decoder,
            model.vision_proj,
            model.text_proj,
            model.itm_head,
        ]
    elif task == "caption":
        used = [model.vision_model, model.text_decoder]
    else:
        used = [
            model.vision_model,
            model.text_encoder,
            model.vision_proj,
            model.text_proj,
            model.itm_head,
        ]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in used:
        for p in module.parameters():
            p.requires_grad_(True)
    model.temp.requires_grad_(task != "caption")
    # Momentum encoders follow by EMA, never by gradient.
    for p in model.momentum_parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# the loop


def _precision(precision: str) -> str:
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _check_resume(config: TrainConfig, stored: dict) -> None:
    ours = config.to_dict()
    changed = [k for k in RESUME_KEYS if stored.get(k) != ours.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} → {ours.get(k)!r}" for k in changed)
        raise CapfiltError(
            f"{config.out!r} holds a run with other options ({detail}); pass the "
            "same options to resume it, or --overwrite to start again"
        )


def train(config: TrainConfig, console=None) -> TrainResult:
    """Run pretraining or finetuning under Accelerate, resuming from the newest checkpoint."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from capfilt.layout import package_versions

    # Launched as several processes on a machine without CUDA (`accelerate launch --multi_gpu
    # --num_processes N` or torchrun there): Accelerate needs cpu=True to pick gloo and
    # MULTI_CPU instead of falling back to N independent single-process runs.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=_precision(config.precision),
        cpu=several and not torch.cuda.is_available(),
    )
    run_dir = Path(config.out)
    if accelerator.is_main_process:
        if config.overwrite and run_dir.exists():
            for entry in run_dir.iterdir():
                if CHECKPOINT_DIR.match(entry.name) or entry.name in ("log.jsonl", "tokenizer"):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    resume = latest_checkpoint(run_dir)
    metadata = read_metadata(resume) if resume else None
    if metadata:
        _check_resume(config, metadata["train_config"])

    pairs = load_pairs(config.datasets, config.source, config.max_words)
    if metadata:
        from capfilt.models.med import MED, MEDConfig

        tokenizer = _load_tokenizer(str(run_dir / "tokenizer"))
        model = MED(MEDConfig.from_dict(metadata["model_config"]))
    else:
        model, tokenizer = init_model(config, pairs.texts, accelerator)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    model_config = model.config

    prefix = config.prompt if config.task == "caption" else ""
    prompt_length = len(tokenizer(prefix).input_ids) - 1 if prefix else 0
    max_length = config.max_words + prompt_length + 10  # words become more than one token
    max_length = min(max_length, int(model_config.text["max_position_embeddings"]))
    dataset = PairDataset(
        pairs,
        model_config.image_size,
        config.seed,
        augment=True,
        flip=config.flip,
        crop_scale=config.crop_scale,
    )
    sampler = EpochShuffle(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=Collate(tokenizer, max_length, prefix),
        num_workers=config.num_workers,
        # Its own generator, so creating an iterator never draws from the global RNG, which
        # samples hard negatives and must replay exactly on resume.
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    if len(loader) == 0:
        raise CapfiltError(
            f"{len(dataset)} pairs do not fill one batch of {config.batch_size}; lower --batch-size"
        )

    if config.compile:
        from capfilt.models.med import compile_layers

        compile_layers(model)
    params = trainable_parameters(model, config.task)
    # The fused kernel updates all parameters in a few launches instead of several per tensor.
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=accelerator.device.type == "cuda",
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = min(config.warmup_steps, total_steps // 10)
    epochs = math.ceil(total_steps / steps_per_epoch)

    step, epoch, skip = 0, 0, 0
    if metadata:
        accelerator.load_state(str(resume))
        step, epoch, skip = metadata["step"], metadata["epoch"], metadata["batches_in_epoch"]
        if skip >= batches_per_epoch:
            epoch, skip = epoch + 1, 0
    resolved = {
        "model_config": model_config.to_dict(),
        "train_config": config.to_dict(),
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "examples": len(pairs),
        "skipped": pairs.skipped,
    }
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "config.json", resolved)

    log_file = run_dir / "log.jsonl"
    if accelerator.is_main_process:
        # Lines past the checkpoint were logged by a killed run (all of them, when it was
        # killed before its first checkpoint); this run logs those steps again.
        _truncate_log(log_file, step)
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    sums: dict[str, float] = {}
    micro = 0
    checkpoint = resume
    losses: dict[str, float] = dict(metadata["losses"]) if metadata else {}
    timed_images, timed_seconds = 0, 0.0
    tick = time.perf_counter()
    progress = _progress(console, accelerator.is_main_process and config.progress)
    task_id = progress.add_task(config.task, total=total_steps, completed=step, stats="")
    with progress:
        while step < total_steps and epoch < epochs:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch_loader.set_epoch(epoch)
            batch_index = skip
            for batch in epoch_loader:
                alpha = itc_alpha(model_config.alpha, epoch, batch_index, batches_per_epoch)
                lr = learning_rate(
                    step,
                    base_lr=config.lr,
                    min_lr=config.min_lr,
                    warmup_lr=config.warmup_lr,
                    warmup_steps=warmup_steps,
                    total_steps=total_steps,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.accumulate(model):
                    terms = model(
                        **batch, alpha=alpha, losses=config.losses, prompt_length=prompt_length
                    )
                    loss = sum(terms.values())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach()  # stays on device
                micro += 1
                batch_index += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                losses = {name: float(total) / micro for name, total in sums.items()}
                sums, micro = {}, 0
                now = time.perf_counter()
                if step > 1 or metadata:  # the first step pays for warm-up, not throughput
                    timed_images += images_per_step
                    timed_seconds += now - tick
                tick = now
                rate = timed_images / timed_seconds if timed_seconds else 0.0
                if accelerator.is_main_process:
                    _append_log(
                        log_file,
                        dict(
                            step=step,
                            epoch=epoch,
                            lr=lr,
                            alpha=alpha,
                            images_per_s=round(rate, 2),
                            **{f"loss_{k}": v for k, v in losses.items()},
                        ),
                    )
                    stats = "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
                    progress.update(
                        task_id, completed=step, stats=f"{stats}  lr {lr:.2e}  {rate:.1f} img/s"
                    )
                if step % config.save_every == 0 or step == total_steps:
                    meta = dict(
                        resolved,
                        step=step,
                        epoch=epoch,
                        batches_in_epoch=batch_index,
                        losses=losses,
                        versions=package_versions(),
                        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    )
                    checkpoint = save_checkpoint(accelerator, run_dir, step, meta, config.keep_last)
                    tick = time.perf_counter()  # saving is not training time
                if step >= total_steps:
                    break
            epoch, skip = epoch + 1, 0
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_dir,
        step,
        total_steps,
        checkpoint,
        timed_images / timed_seconds if timed_seconds else 0.0,
        losses,
        len(pairs),
        pairs.skipped,
        metadata["step"] if metadata else None,
        accelerator.is_main_process,
    )


def _progress(console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (a killed run logged them)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # a kill while truncating must not lose the kept lines


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-step records of a run's log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
