"""The Accelerate loop of `pretrain` and `finetune`: data, schedule, checkpoints, resume.

A run folder holds:

    RUN/config.json        the resolved configuration of the run (model and training)
    RUN/tokenizer/         the tokenizer the run trains with
    RUN/log.jsonl          one line per optimizer step: losses, lr, images/s
    RUN/step-N/            accelerator.save_state(...) + metadata.json, written LAST

A checkpoint counts only once its metadata.json exists; the last `keep_last` are kept.
    RUN/data_plan.json     the training data: every shard of every dataset and its pairs

The data streams (training/stream.py): shard by shard, decoded in DataLoader workers, never
all in memory. Re-running the same command resumes from the newest checkpoint, mid-epoch
included: the data order is a pure function of (seed, epoch), augmentation of (seed, epoch,
pair), and the RNG that samples ITM's hard negatives is restored by `load_state`, so a resumed
run follows the loss trajectory of an uninterrupted one."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from capfilt.core.distributed import sum_counts
from capfilt.core.errors import CapfiltError
from capfilt.core.progress import step_progress
from capfilt.models.shapes import DEFAULT_SHARING
from capfilt.training.config import RESUME_KEYS, TEXT_TOKENS, TrainConfig
from capfilt.training.init import init_model, load_tokenizer, trainable_parameters
from capfilt.training.pairs import DecodeBatch
from capfilt.training.runs import (
    CHECKPOINT_DIR,
    append_log,
    latest_checkpoint,
    read_metadata,
    save_checkpoint,
    truncate_log,
    write_json_atomic,
)
from capfilt.training.stream import (
    PLAN_FILE,
    DataPlan,
    EpochBatches,
    batches_per_epoch,
    training_loader,
)


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


def blip_learning_rate(
    step: int,
    epoch: int,
    *,
    base_lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    decay_rate: float,
) -> float:
    """BLIP's pretraining schedule: in epoch 0 a linear warm-up from `warmup_lr` over
    `warmup_steps` (capped at `base_lr`), from epoch 1 on `base_lr × decay_rate^epoch` (at
    least `min_lr`), constant within the epoch (utils.py of salesforce/BLIP)."""
    if epoch == 0:
        if not warmup_steps:
            return base_lr
        return min(base_lr, warmup_lr + (base_lr - warmup_lr) * step / warmup_steps)
    return max(min_lr, base_lr * decay_rate**epoch)


def itc_alpha(
    alpha: float, epoch: int, batch_index: int, batches_per_epoch: int, ramp_epochs: int = 1
) -> float:
    """BLIP ramps the distillation weight in linearly over the first `ramp_epochs` epochs."""
    done = epoch * batches_per_epoch + batch_index
    return alpha * min(1.0, done / max(1, ramp_epochs * batches_per_epoch))


def _precision(precision: str) -> str:
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _check_resume(config: TrainConfig, metadata: dict, processes: int) -> None:
    stored = metadata["train_config"]
    ours = config.to_dict()
    changed = [k for k in RESUME_KEYS if stored.get(k) != ours.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} → {ours.get(k)!r}" for k in changed)
        raise CapfiltError(
            f"{config.out!r} holds a run with other options ({detail}); pass the "
            "same options to resume it, or --overwrite to start again"
        )
    # The model of a resumed run is its checkpoint's; a run saved before --sharing has BLIP's.
    sharing = metadata["model_config"].get("sharing", DEFAULT_SHARING)
    if config.sharing and config.sharing != sharing:
        raise CapfiltError(
            f"{config.out!r} holds a run with --sharing {sharing}; leave --sharing out (or pass "
            f"{sharing}) to resume it, or --overwrite to start again"
        )
    before = metadata.get("num_processes", processes)
    if before != processes:
        # Each process trains on its own part of every epoch: another count, other parts.
        raise CapfiltError(
            f"{config.out!r} was trained by {before} processes and this run has {processes}; "
            f"resume it with {before} (accelerate launch --num_processes {before}), or pass "
            "--overwrite to start again"
        )


def _plan(config: TrainConfig, run_dir: Path, resuming: bool, accelerator):
    """The run's data plan: every process reads its share of the shards, all get the whole
    plan, the main process writes it; a resumed run reads it back."""
    from accelerate.utils import gather_object

    from capfilt.training.stream import Picking, load_or_build_plan

    weights = config.weights or (1.0,) * len(config.datasets)
    picking = Picking(config.source, config.max_words, seed=config.seed)
    world = accelerator.num_processes
    plan, sources = load_or_build_plan(
        run_dir,
        config.datasets,
        weights,
        picking,
        config.ratio,
        resuming,
        part=(accelerator.process_index, world),
        gather=(lambda obj: gather_object([obj])) if world > 1 else None,
    )
    if accelerator.is_main_process:
        write_json_atomic(run_dir / PLAN_FILE, asdict(plan))
    return plan, sources


def _texts(plan: DataPlan, sources, prompt: str, limit: int = 100_000):
    """Up to `limit` training texts in plan order, for a tokenizer trained from scratch; the
    captioner's prompt first, so that its words are whole tokens (not single letters) when a
    finetuned captioner starts from it."""
    yield prompt
    taken = 0
    for unit in plan.units:
        for candidate in sources[unit.source].candidates(unit.shard, {}):
            yield candidate.text
            taken += 1
            if taken >= limit:
                return


def train(config: TrainConfig, console=None) -> TrainResult:
    """Run pretraining or finetuning under Accelerate, resuming from the newest checkpoint."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from capfilt.core.layout import package_versions

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
        _check_resume(config, metadata, accelerator.num_processes)
        wanted = config.max_steps or metadata["total_steps"]
        if metadata["step"] >= wanted:  # finished: nothing to read, whatever the data is now
            accelerator.end_training()
            return TrainResult(
                run_dir,
                metadata["step"],
                metadata["total_steps"],
                resume,
                0.0,
                dict(metadata["losses"]),
                metadata["examples"],
                sum_counts([metadata.get("skipped", {}), metadata.get("undecodable", {})]),
                metadata["step"],
                accelerator.is_main_process,
            )

    plan, sources = _plan(config, run_dir, metadata is not None, accelerator)
    if metadata:
        from capfilt.models.med import MED, MEDConfig

        tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
        model = MED(MEDConfig.from_dict(metadata["model_config"]))
    else:
        model, tokenizer = init_model(config, _texts(plan, sources, config.prompt), accelerator)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    model_config = model.config
    config = config.with_recipe(
        int(model_config.vision["hidden_size"]), accelerator.device.type == "cpu"
    )
    if config.threads:
        torch.set_num_threads(config.threads)

    prefix = config.prompt if config.task == "caption" else ""
    prompt_length = len(tokenizer(prefix).input_ids) - 1 if prefix else 0
    max_length = min(TEXT_TOKENS[config.task], int(model_config.text["max_position_embeddings"]))
    decoder = DecodeBatch(
        tokenizer,
        max_length,
        model_config.image_size,
        prefix,
        augment=True,
        flip=config.flip,
        crop_scale=config.crop_scale,
    )
    world, rank = accelerator.num_processes, accelerator.process_index

    def batches_of(epoch: int) -> int:
        """Batches of one process in `epoch`, a whole number of optimizer steps."""
        batches = batches_per_epoch(plan, config.seed, epoch, world, config.batch_size)
        return batches // config.grad_accum * config.grad_accum

    if batches_of(0) == 0:
        raise CapfiltError(
            f"{plan.pairs} pairs do not fill one batch of {config.batch_size}"
            + (f" on each of {world} processes" if world > 1 else "")
            + (f" times {config.grad_accum} accumulation steps" if config.grad_accum > 1 else "")
            + "; lower --batch-size"
        )
    sampler = EpochBatches(
        plan, sources, config.seed, rank, world, config.batch_size, config.shuffle_buffer
    )
    loader = training_loader(decoder, sampler, config.num_workers, config.seed)

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
    # The data is this run's own streaming loader: Accelerate must not shard it again.
    model, optimizer = accelerator.prepare(model, optimizer)

    steps_per_epoch = batches_of(0) // config.grad_accum
    total_steps = config.max_steps or sum(
        batches_of(e) // config.grad_accum for e in range(config.epochs)
    )
    # BLIP's schedule warms up over its steps whatever the run's length; the cosine one over
    # at most a tenth of the run.
    warmup_steps = config.warmup_steps
    if config.lr_schedule == "cosine":
        warmup_steps = min(warmup_steps, total_steps // 10)

    step, epoch, skip = 0, 0, 0
    if metadata:
        accelerator.load_state(str(resume))
        step, epoch, skip = metadata["step"], metadata["epoch"], metadata["batches_in_epoch"]
        if skip >= batches_of(epoch):
            epoch, skip = epoch + 1, 0
    resolved = {
        "model_config": model_config.to_dict(),
        "train_config": config.to_dict(),
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "schedule": config.lr_schedule,
        "text_tokens": max_length,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "examples": plan.pairs,
        "mix": plan.mix(),
        "skipped": plan.skipped,
    }
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "config.json", resolved)

    log_file = run_dir / "log.jsonl"
    if accelerator.is_main_process:
        # Lines past the checkpoint were logged by a killed run (all of them, when it was
        # killed before its first checkpoint); this run logs those steps again.
        truncate_log(log_file, step)
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    sums: dict[str, float] = {}
    micro = 0
    checkpoint = resume
    losses: dict[str, float] = dict(metadata["losses"]) if metadata else {}
    timed_images, timed_seconds = 0, 0.0
    tick = time.perf_counter()
    progress = step_progress(console, accelerator.is_main_process and config.progress)
    task_id = progress.add_task(config.task, total=total_steps, completed=step, stats="")
    # Images found undecodable while training, by reason: this process's since the run (or
    # resume) began, plus, in the main process, the whole run's before the resume.
    undecodable = (
        dict(metadata.get("undecodable", {})) if metadata and accelerator.is_main_process else {}
    )
    trace = _Trace(accelerator.process_index)
    pending = None  # the last optimizer step's _StepLog, its losses not yet read

    def log_step(entry: _StepLog) -> dict[str, float]:
        """Read one step's mean losses (waiting for that step on the device), log and show them."""
        step_losses = {name: float(total) / entry.micro for name, total in entry.sums.items()}
        if accelerator.is_main_process:
            append_log(
                log_file,
                dict(
                    step=entry.step,
                    epoch=entry.epoch,
                    lr=entry.lr,
                    alpha=entry.alpha,
                    images_per_s=round(entry.rate, 2),
                    **{f"loss_{k}": v for k, v in step_losses.items()},
                ),
            )
            stats = "  ".join(f"{k} {v:.3f}" for k, v in step_losses.items())
            progress.update(
                task_id,
                completed=entry.step,
                stats=f"{stats}  lr {entry.lr:.2e}  {entry.rate:.1f} img/s",
            )
        return step_losses

    with progress:
        while step < total_steps:
            batches = batches_of(epoch)
            sampler.set_epoch(epoch, batches, skip)
            batch_index = skip
            for batch in loader:
                for why, n in batch.pop("skipped").items():
                    undecodable[why] = undecodable.get(why, 0) + n
                trace.write(epoch, step, batch.pop("keys"))
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                alpha = itc_alpha(
                    model_config.alpha, epoch, batch_index, batches, config.alpha_ramp_epochs
                )
                lr = _lr(config, step, epoch, warmup_steps, total_steps)
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
                now = time.perf_counter()
                if step > 1 or metadata:  # the first step pays for warm-up, not throughput
                    timed_images += images_per_step
                    timed_seconds += now - tick
                tick = now
                rate = timed_images / timed_seconds if timed_seconds else 0.0
                # This step's losses are read (a host sync) only after the next step is queued,
                # so the device never waits for the logging.
                if pending is not None:
                    losses = log_step(pending)
                pending = _StepLog(step, epoch, lr, alpha, rate, sums, micro)
                sums, micro = {}, 0
                if step % config.save_every == 0 or step == total_steps:
                    losses, pending = log_step(pending), None
                    meta = dict(
                        resolved,
                        undecodable=sum_counts(gather_object([undecodable])),
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
    skipped = sum_counts([plan.skipped, *gather_object([undecodable])])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_dir,
        step,
        total_steps,
        checkpoint,
        timed_images / timed_seconds if timed_seconds else 0.0,
        losses,
        plan.pairs,
        skipped,
        metadata["step"] if metadata else None,
        accelerator.is_main_process,
    )


@dataclass
class _StepLog:
    """One optimizer step's figures for the log; `sums` (loss name → sum over its micro-batches)
    are still tensors on the device."""

    step: int
    epoch: int
    lr: float
    alpha: float
    rate: float
    sums: dict
    micro: int


def _lr(config: TrainConfig, step: int, epoch: int, warmup_steps: int, total_steps: int):
    if config.lr_schedule == "blip":
        return blip_learning_rate(
            step,
            epoch,
            base_lr=config.lr,
            min_lr=config.min_lr,
            warmup_lr=config.warmup_lr,
            warmup_steps=warmup_steps,
            decay_rate=config.lr_decay_rate,
        )
    return learning_rate(
        step,
        base_lr=config.lr,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
    )


class _Trace:
    """With CAPFILT_TRACE_PAIRS=FILE (tests): each process appends the keys it trains on."""

    def __init__(self, rank: int):
        self.path = os.environ.get("CAPFILT_TRACE_PAIRS")
        self.rank = rank

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.writelines(f"{self.rank} {epoch} {step} {key}\n" for key in keys)
