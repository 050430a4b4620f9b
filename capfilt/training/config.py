"""Options of one `pretrain` or `finetune` run, declared once (core/options.py): both
commands are derived from `TrainConfig`, finetune with its own defaults (FINETUNE_DEFAULTS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from capfilt.core.errors import CapfiltError
from capfilt.core.options import Options, option
from capfilt.models.shapes import DEFAULT_SHARING, MED_SHARING

TASKS = {"pretrain": ("itc", "itm", "lm"), "caption": ("lm",), "itm": ("itc", "itm")}
SOURCES = ("all", "web", "synthetic")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRESETS = ("tiny", "base", "large")
SCHEDULES = ("blip", "cosine")
PROMPT = "a picture of "  # BLIP's captioning prompt (caption finetuning and evaluation)
# Text tokens per task, as BLIP's models truncate them (blip_pretrain.py, blip.py,
# blip_retrieval.py).
TEXT_TOKENS = {"pretrain": 30, "caption": 40, "itm": 35}

# Options that fix the data order: a resumed run must use the same ones.
RESUME_KEYS = (
    "task",
    "datasets",
    "weights",
    "source",
    "batch_size",
    "grad_accum",
    "seed",
    "shuffle_buffer",
)

# The paper's COCO finetuning, where it differs from pretraining.
FINETUNE_DEFAULTS = dict(task="caption", min_lr=0.0, warmup_steps=0, finetuning=True)

# What --lr and --epochs default to, by (finetuning, small model): BLIP's pretraining and COCO
# finetuning for its ViT-B/L models, and a recipe a model narrower than ViT-B (the tiny preset)
# learns a small dataset with in minutes on a CPU: at BLIP's rates it hardly moves (on a
# 1,200-pair toy web, finetuning a tiny filter at 1e-5 for 5 epochs gave an ITM AUC of 0.69).
RECIPES = {
    (False, False): dict(lr=3e-4, epochs=20),
    (True, False): dict(lr=1e-5, epochs=5),
    (False, True): dict(lr=1e-3, epochs=20),
    (True, True): dict(lr=1e-3, epochs=30),
}
SMALL_WIDTH = 768  # a vision width below ViT-B's: the small-model recipe


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Options):
    """Options of one `pretrain` or `finetune` run (defaults follow BLIP's pretraining)."""

    datasets: tuple[str, ...] = option(
        help="Dataset folders (curated/, or images/ with their web captions).", positional=True
    )
    out: str = option(help="Run folder: checkpoints step-N/, log.jsonl.", flag="--out")
    task: str = option(
        "pretrain",
        "pretrain: ITC + ITM + LM; caption: LM with a prompt; itm: ITC + ITM (the filter).",
        choices=tuple(TASKS),
    )
    weights: tuple[float, ...] | None = option(
        None,
        "How often each dataset is seen per epoch, one weight per DATASET, comma-separated "
        "(2,1: the first twice); a fraction takes a seeded part of that dataset's shards.",
        split=",",
        cli_default="1 for each",
    )
    preset: str = option("base", "Model size when not --init.", choices=PRESETS)
    sharing: str | None = option(
        None,
        "Layers the text decoder shares with the text encoder, as BLIP's Table 3 ablates: "
        "all-but-sa (BLIP's: all but self-attention), all (self-attention too), all-but-ca "
        "(all but cross-attention), none (the decoder has its own embeddings, layers and LM "
        "head). A run keeps its sharing: resume and --init RUN refuse another.",
        choices=tuple(MED_SHARING),
        cli_default=f"--init's, else {DEFAULT_SHARING}",
    )
    init: tuple[str, ...] = option(
        (),
        "Start from HF BLIP weights (captioner and/or ITM model: hub id or local dir, "
        "safetensors only; repeat for both) or a capfilt run/export folder.",
    )
    tokenizer: str | None = option(
        None,
        "Tokenizer: a saved folder or hub id, e.g. BERT's uncased one as in BLIP "
        "(bert-base-uncased; [DEC] and [ENC] are added).",
        cli_default="--init's, else a WordPiece trained on the training texts",
    )
    vocab_size: int = 30522  # of a WordPiece trained from scratch
    source: str = option("all", "Train on web texts, synthetic ones, or all.", choices=SOURCES)
    web_synthetic_ratio: str | None = option(
        None,
        "Web to synthetic caption pairs, as W:S (1:1, 1:2): the more frequent kind is thinned "
        "to it by a seeded draw per pair (the ratio holds on average), the same every epoch.",
        cli_default="as the data has them",
    )
    batch_size: int = option(32, "Pairs per batch per process.", ge=1)
    grad_accum: int = option(1, "Gradient accumulation steps.", ge=1)
    epochs: int | None = option(
        None,
        "Epochs (ignored with --max-steps).",
        ge=1,
        cli_default="BLIP's 20 pretraining, 5 finetuning; 30 finetuning a model narrower than "
        "ViT-B (the tiny preset)",
    )
    max_steps: int | None = option(None, "Stop after this many optimizer steps.", ge=1)
    lr: float | None = option(
        None,
        "Peak learning rate.",
        ge=0,
        cli_default="BLIP's 3e-4 pretraining, 1e-5 finetuning; 1e-3 for a model narrower than "
        "ViT-B (the tiny preset)",
    )
    schedule: str | None = option(
        None,
        "blip: linear warm-up in epoch 0, then the peak rate × 0.9^epoch (BLIP's pretraining); "
        "cosine: warm-up, then cosine decay per step.",
        choices=SCHEDULES,
        cli_default="blip for pretrain with --preset base or large, else cosine",
    )
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    lr_decay_rate: float = 0.9  # the blip schedule's decay per epoch
    warmup_steps: int = option(
        3000, "Linear warm-up steps (the cosine schedule: at most 10% of the run).", ge=0
    )
    weight_decay: float = option(0.05, "AdamW weight decay.", ge=0)
    max_grad_norm: float | None = None
    max_words: int = 30
    image_size: int | None = option(
        None,
        "Image side in pixels: a model of another size gets its position embeddings "
        "interpolated (BLIP finetunes at 384 what it pretrained at 224).",
        ge=16,
        cli_default="the model's",
    )
    prompt: str = option(PROMPT, "Captioner prompt (its tokens get no loss).")
    flip: bool = option(True, "Random horizontal flips (turn off when captions say left/right).")
    crop_scale: tuple[float, float] = option(
        (0.5, 1.0),
        "Random crops keep this fraction of the image's area, MIN,MAX (BLIP: 0.5,1).",
        split=",",
    )
    queue_size: int | None = option(None, "ITC feature queue size (BLIP: 57600).", ge=1)
    alpha: float | None = None
    precision: str = option(
        "auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", choices=PRECISIONS
    )
    compile: bool = option(
        False, "torch.compile each transformer layer (GPU; the first steps compile)."
    )
    seed: int = option(42, "Seed of initialisation, data order and augmentation.")
    save_every: int = option(1000, "Checkpoint every N optimizer steps.", ge=1)
    keep_last: int = option(2, "Keep the last K checkpoints.", ge=1)
    num_workers: int = option(4, "DataLoader worker processes for JPEG decoding.", ge=0)
    threads: int | None = option(
        None,
        "CPU threads of torch in the training process.",
        ge=1,
        cli_default="1 for a model narrower than ViT-B on a CPU (its tiny products gain "
        "nothing from more), else torch's",
    )
    shuffle_buffer: int = option(
        4096,
        "Pairs held in the shuffle buffer (their image bytes are in memory): more mixes shards "
        "better, fewer uses less memory.",
        ge=1,
    )
    overwrite: bool = option(False, "Start again instead of resuming --out.")
    progress: bool = True
    finetuning: bool = False  # `capfilt finetune`: its recipe of --lr and --epochs

    def with_recipe(self, vision_width: int, on_cpu: bool) -> TrainConfig:
        """These options with --lr, --epochs and --threads filled in when not given: from
        RECIPES, and one thread for a small model on a CPU (on two cores a tiny model's
        finetuning ran at 14 images/s with torch's threads and 616 with one)."""
        small = vision_width < SMALL_WIDTH
        recipe = dict(RECIPES[self.finetuning, small], threads=1 if small and on_cpu else None)
        given = {"lr": self.lr, "epochs": self.epochs, "threads": self.threads}
        return replace(self, **{k: recipe[k] if v is None else v for k, v in given.items()})

    def check(self) -> None:
        if self.batch_size < 2 and self.task != "caption":
            raise CapfiltError(
                "--batch-size must be at least 2: ITM samples its negatives "
                "from the other pairs of the batch"
            )
        if not self.datasets:
            raise CapfiltError("give at least one DATASET folder")
        if self.weights is not None:
            if len(self.weights) != len(self.datasets):
                raise CapfiltError(
                    f"--weights gives {len(self.weights)} weights for {len(self.datasets)} "
                    "datasets; give one per dataset"
                )
            if any(not w > 0 for w in self.weights):
                raise CapfiltError(f"--weights must all be > 0, got {list(self.weights)}")
        if self.ratio and self.source != "all":
            raise CapfiltError("--web-synthetic-ratio mixes both kinds: use it with --source all")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise CapfiltError("--crop-scale must be two numbers 0 < min <= max <= 1")

    @property
    def losses(self) -> tuple[str, ...]:
        return TASKS[self.task]

    @property
    def ratio(self) -> tuple[float, float] | None:
        """--web-synthetic-ratio as (web, synthetic), or None."""
        if not self.web_synthetic_ratio:
            return None
        web, sep, synthetic = self.web_synthetic_ratio.partition(":")
        try:
            parts = (float(web), float(synthetic))
        except ValueError:
            parts = None
        if not sep or parts is None or min(parts) <= 0:
            raise CapfiltError(
                f"--web-synthetic-ratio takes W:S with two numbers > 0 (1:1, 1:2), not "
                f"{self.web_synthetic_ratio!r}"
            )
        return parts

    @property
    def lr_schedule(self) -> str:
        if self.schedule:
            return self.schedule
        return "blip" if self.task == "pretrain" and self.preset in ("base", "large") else "cosine"

    @property
    def alpha_ramp_epochs(self) -> int:
        """Epochs over which ITC's distillation weight ramps in: 2 in BLIP's pretraining,
        1 in its retrieval finetuning."""
        return 2 if self.task == "pretrain" else 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["datasets"], data["init"] = list(self.datasets), list(self.init)
        data["weights"] = None if self.weights is None else list(self.weights)
        data["crop_scale"] = list(self.crop_scale)
        return data
