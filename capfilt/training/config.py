"""Options of one `pretrain` or `finetune` run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.core.errors import CapfiltError

TASKS = {"pretrain": ("itc", "itm", "lm"), "caption": ("lm",), "itm": ("itc", "itm")}


SOURCES = ("all", "web", "synthetic")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
