"""`capfilt evaluate MODEL DATASET`: image-text retrieval recall and captioning scores.

MODEL is a capfilt run folder (pretrain or finetune), an export folder, or a BLIP ITM
checkpoint (its ITC heads are used) or BLIP captioner checkpoint.

Both directions rank by ITC similarity (cosine of the projected unimodal features), as
BLIP's first retrieval stage does:

    image → text   for each image, rank every distinct text of the dataset
    text → image   for each distinct text, rank every image

Web datasets repeat texts ("stock photo") and COCO gives an image five captions, so a hit
is any pair the dataset holds: an image's gold texts are the texts of its rows, and a text's
gold images are the images it is the caption of. Identical texts are ranked once.

When MODEL can caption (a pretrain or caption-finetune run, an export with captioner/, a BLIP
captioner), each distinct image is also captioned as BLIP's COCO evaluation does (beam search,
3 beams, 5 to 20 tokens, the prompt "a picture of " stripped, fp32) and scored against every
text of it with COCO's metrics (caption_metrics.py). Images are told apart by their bytes, since
a COCO annotation file becomes one row, with its own key, per caption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.core.options import Options, option
from capfilt.training.caption_metrics import METRICS
from capfilt.training.config import PROMPT

KS = (1, 5, 10)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Options):
    """Options of one evaluation: retrieval, and captioning where MODEL can caption."""

    caption_col: str = option(
        "caption", "Column of images/ with the reference texts (e.g. true_caption)."
    )
    batch_size: int = option(64, "Images or texts per forward pass.", ge=1)
    max_images: int | None = option(None, "Evaluate on the first N usable images only.", ge=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    captioning: bool = option(
        True,
        "Also caption every image and score the captions against its texts (BLEU-4, CIDEr, "
        "METEOR, SPICE), when MODEL can caption.",
    )
    caption_metrics: tuple[str, ...] = option(
        METRICS,
        "Captioning metrics, comma-separated; METEOR and SPICE need Java, SPICE also Stanford "
        "CoreNLP (left out, with the reason, when they cannot run).",
        split=",",
    )
    num_beams: int = option(3, "Beams of the captioning beam search.", ge=1)
    min_length: int = option(5, "Minimum caption tokens, prompt included.", ge=0)
    max_length: int = option(20, "Maximum caption tokens, prompt included.", ge=1)
    prompt: str | None = option(
        None,
        "Text the captions start from, stripped from them.",
        cli_default=f"a caption-finetuned run's own, none for a pretraining run, else {PROMPT!r}",
    )

    def check(self) -> None:
        unknown = [m for m in self.caption_metrics if m not in METRICS]
        if unknown or not self.caption_metrics:
            raise CapfiltError(
                f"--caption-metrics takes some of {','.join(METRICS)}, "
                f"not {','.join(self.caption_metrics)!r}"
            )
        if self.min_length > self.max_length:
            raise CapfiltError(
                f"--min-length ({self.min_length}) is larger than --max-length ({self.max_length})"
            )


@dataclass
class EvaluationResult:
    model: str
    dataset: str
    step: int | None  # of a capfilt run's checkpoint; None for a BLIP checkpoint
    images: int
    texts: int
    # "R@1" → fraction of images with a gold text in the top 1; None without ITC heads
    image_to_text: dict[str, float] | None
    text_to_image: dict[str, float] | None
    skipped: dict[str, int] = field(default_factory=dict)
    # caption_metrics' scores, counts and `unavailable`, with "decoding"; None when not scored
    captioning: dict | None = None
    not_scored: dict[str, str] = field(default_factory=dict)  # "captioning" → why not

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetrievalSet:
    """Distinct images and distinct texts, and which (image, text) pairs are gold."""

    keys: list[str]
    images: list[bytes]
    texts: list[str]
    gold: set[tuple[int, int]]  # (image index, text index)
    skipped: dict[str, int]
    # each image's texts as written (not cleaned), one per row: captioning's references
    references: list[list[str]] = field(default_factory=list)


def load_retrieval_set(
    dataset: str, caption_col: str = "caption", max_images: int | None = None, max_words: int = 30
) -> RetrievalSet:
    """The images of DATASET/images/ that downloaded, and their texts, deduplicated."""
    from capfilt.core.layout import Dataset
    from capfilt.images.decode import decode_image
    from capfilt.training.pairs import pre_caption

    ds = Dataset(dataset)
    shards = ds.require_stage("images", "fetch or ingest images first (capfilt fetch/ingest)")
    result = RetrievalSet([], [], [], set(), {})
    image_of: dict[str, int] = {}
    text_of: dict[str, int] = {}

    def skip(reason: str) -> None:
        result.skipped[reason] = result.skipped.get(reason, 0) + 1

    for shard in shards:
        table = ds.read_shard("images", shard)
        if caption_col not in table.column_names:
            raise CapfiltError(
                f"{dataset!r} has no column {caption_col!r} in images/; pick one of "
                f"{', '.join(c for c in table.column_names if c != 'jpg')} with --caption-col"
            )
        for row in table.select(["key", "status", "jpg", caption_col]).to_pylist():
            text = pre_caption(str(row[caption_col] or ""), max_words)
            if row["status"] != "success" or not row["jpg"]:
                skip("image not downloaded")
                continue
            if not text:
                skip("empty text")
                continue
            image = image_of.get(row["key"])
            if image is None:
                if max_images is not None and len(result.images) >= max_images:
                    continue
                if not decode_image(row["jpg"]).ok:
                    skip("image not decodable")
                    continue
                image = image_of[row["key"]] = len(result.images)
                result.keys.append(row["key"])
                result.images.append(row["jpg"])
                result.references.append([])
            index = text_of.setdefault(text, len(result.texts))
            if index == len(result.texts):
                result.texts.append(text)
            result.gold.add((image, index))
            result.references[image].append(" ".join(str(row[caption_col]).split()))
    if len(result.images) < 2:
        raise CapfiltError(
            f"{dataset!r} has {len(result.images)} usable images; retrieval needs at least 2"
        )
    return result


def recall_at_k(similarity, gold, ks=KS) -> dict[str, float]:
    """R@K of ranking columns for each row of `similarity` (rows, columns); `gold` is bool."""
    import torch

    order = similarity.argsort(dim=1, descending=True)  # (R, C)
    hits = torch.gather(gold, 1, order)  # (R, C): is the column at rank r gold
    first_hit = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), hits.shape[1])  # (R,)
    return {f"R@{k}": round(float((first_hit < k).double().mean()), 6) for k in ks}


class RunEncoder:
    """ITC features from the newest checkpoint of a capfilt run folder (MED)."""

    def __init__(self, run: str, device: str):
        import torch

        from capfilt.training.runs import load_run

        self.model, self.tokenizer, metadata = load_run(run)
        self.step = int(metadata["step"])
        self.train_config = metadata["train_config"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)

    def image_features(self, images: list):
        """(N, E) unit-norm features of RGB PIL images, preprocessed as in training."""
        import torch
        import torch.nn.functional as F
        from PIL import Image

        from capfilt.training.pairs import to_pixels

        size = self.model.config.image_size
        pixels = torch.stack(
            [to_pixels(image.resize((size, size), Image.BICUBIC)) for image in images]
        ).to(self.device)  # (N, 3, H, W)
        cls = self.model.image_embeds(pixels)[:, 0, :]  # (N, V)
        return F.normalize(self.model.vision_proj(cls), dim=-1)

    def text_features(self, texts: list[str]):
        """(M, E) unit-norm features of the unimodal text encoder's [CLS]."""
        import torch.nn.functional as F

        tokens = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=int(self.model.config.text["max_position_embeddings"]),
            return_tensors="pt",
        ).to(self.device)
        cls = self.model.text_embeds(tokens["input_ids"], tokens["attention_mask"])[:, 0, :]
        return F.normalize(self.model.text_proj(cls), dim=-1)

    def captioner(self, model: str):
        """A BLIP captioner over this run's image encoder and text decoder, in fp32."""
        import torch
        from transformers import BlipProcessor

        from capfilt.models.blip import Captioner, ModelSource
        from capfilt.models.tiny import image_processor

        network = self.model.to_blip("captioner").to(self.device)
        processor = BlipProcessor(
            image_processor=image_processor(self.model.config.image_size),
            tokenizer=self.tokenizer,
        )
        source = ModelSource(model, Path(model), f"step-{self.step}")
        return Captioner(network, processor, source, self.device, torch.float32, engine="hf")


class FilterEncoder:
    """ITC features from a BLIP ITM checkpoint (`capfilt export`'s filter/ or a hub id)."""

    step = None

    def __init__(self, model: str, device: str):
        from capfilt.models.blip import ItmScorer

        self.scorer = ItmScorer.load(model, precision="fp32", device=device)

    def image_features(self, images: list):
        from capfilt.images.pixels import preprocess

        return self.scorer.encode_images(preprocess(self.scorer.image_processor, images)).itc

    def text_features(self, texts: list[str]):
        input_ids, attention_mask = self.scorer.tokenize(texts)
        return self.scorer.fast().text_features(input_ids, attention_mask)


@dataclass
class Models:
    """What MODEL offers: ITC features for retrieval, a captioner, and why either is missing."""

    encoder: RunEncoder | FilterEncoder | None
    captioner: object | None  # capfilt.models.blip.Captioner
    step: int | None = None
    prompt: str = PROMPT  # the prompt the captioner was trained with
    not_scored: dict[str, str] = field(default_factory=dict)


def load_models(model: str, config: EvaluateConfig) -> Models:
    """A capfilt run folder, an export folder (filter/, captioner/), or a BLIP checkpoint."""
    from capfilt.training.runs import METADATA, find_checkpoint

    path = Path(model)
    if find_checkpoint(path) is not None:
        return run_models(model, config)
    filter_dir, captioner_dir = path / "filter", path / "captioner"
    if (filter_dir / "config.json").is_file() or (captioner_dir / "config.json").is_file():
        has_filter = (filter_dir / "config.json").is_file()
        has_captioner = (captioner_dir / "config.json").is_file()
        no_filter, no_captioner = "holds no filter/ (ITC heads)", "holds no captioner/"
    elif path.is_dir() and not (path / "config.json").is_file():
        raise CapfiltError(
            f"{model!r} has no complete checkpoint (step-N/{METADATA}) and no BLIP config.json; "
            "pass a folder written by `capfilt pretrain`/`finetune`/`export` or a BLIP checkpoint"
        )
    else:
        has_captioner = blip_architecture(model) == "BlipForConditionalGeneration"
        has_filter = not has_captioner
        filter_dir = captioner_dir = model
        no_filter = "is a BLIP captioner (no ITC heads)"
        no_captioner = "is a BLIP ITM filter (no text decoder)"
    if not has_filter and not config.captioning:
        raise CapfiltError(
            f"{model!r} {no_filter}, so no retrieval, and --no-captioning leaves nothing to "
            "evaluate"
        )
    found = Models(None, None)
    if has_filter:
        found.encoder = FilterEncoder(str(filter_dir), config.device)
    else:
        found.not_scored["retrieval"] = f"{model!r} {no_filter}"
    if not has_captioner:
        found.not_scored["captioning"] = f"{model!r} {no_captioner}"
    elif config.captioning:
        found.captioner = load_captioner(str(captioner_dir), config.device)
    return found


def run_models(run: str, config: EvaluateConfig) -> Models:
    """The ITC heads and, unless it was finetuned as a filter, the captioner of a run."""
    encoder = RunEncoder(run, config.device)
    found = Models(encoder, None, encoder.step)
    task = encoder.train_config.get("task")
    if task == "itm":
        found.not_scored["captioning"] = (
            "an ITM-finetuned run is a filter: its finetuning trained matching, not "
            "captioning (evaluate the run it started from for captioning)"
        )
    elif config.captioning:
        found.captioner = encoder.captioner(run)
        if task == "caption":
            found.prompt = encoder.train_config.get("prompt", PROMPT)
        else:  # pretraining's LM learned the texts from [DEC] on, with no prompt before them
            found.prompt = ""
    return found


def blip_architecture(model: str) -> str | None:
    """The architecture a BLIP checkpoint's config.json names (local dir or hub id)."""
    import json

    from capfilt.models.blip import resolve_checkpoint

    config = resolve_checkpoint(model).path / "config.json"
    if not config.is_file():
        return None
    return next(iter(json.loads(config.read_text()).get("architectures") or []), None)


def load_captioner(model: str, device: str):
    """A BLIP captioner checkpoint in fp32, decoded by transformers' beam search."""
    from capfilt.models.blip import Captioner

    return Captioner.load(model, precision="fp32", device=device, engine="hf")


def itc_features(encoder, data: RetrievalSet, batch_size: int):
    """Normalised ITC features of every image (N, E) and every text (M, E), float32 on CPU."""
    import torch

    from capfilt.images.decode import decode_image

    image_feats, text_feats = [], []
    with torch.inference_mode():
        for start in range(0, len(data.images), batch_size):
            batch = data.images[start : start + batch_size]
            images = [decode_image(jpg).image for jpg in batch]
            image_feats.append(encoder.image_features(images).float().cpu())
        for start in range(0, len(data.texts), batch_size):
            text_feats.append(
                encoder.text_features(data.texts[start : start + batch_size]).float().cpu()
            )
    return torch.cat(image_feats), torch.cat(text_feats)


def distinct_images(data: RetrievalSet) -> tuple[list[str], list[bytes], list[list[str]]]:
    """Each distinct image once, told apart by its bytes, with every text of it (first key)."""
    first: dict[bytes, int] = {}
    keys: list[str] = []
    images: list[bytes] = []
    references: list[list[str]] = []
    for key, jpg, texts in zip(data.keys, data.images, data.references, strict=True):
        at = first.setdefault(jpg, len(keys))
        if at == len(keys):
            keys.append(key)
            images.append(jpg)
            references.append([])
        references[at].extend(texts)
    return keys, images, references


def generate_captions(
    captioner, images: list[bytes], config: EvaluateConfig, prompt: str, progress: bool = False
) -> list[str]:
    """One beam-search caption per image, from the image alone, the prompt stripped."""
    from capfilt.core.progress import image_progress
    from capfilt.images.decode import decode_image
    from capfilt.images.pixels import preprocess

    captions: list[str] = []
    with image_progress(len(images), "captioning", enabled=progress) as bar:
        for start in range(0, len(images), config.batch_size):
            batch = [decode_image(jpg).image for jpg in images[start : start + config.batch_size]]
            per_image = captioner.generate_captions(
                preprocess(captioner.image_processor, batch),
                prompt=prompt,
                decoding="beam",
                num_beams=config.num_beams,
                min_length=config.min_length,
                max_length=config.max_length,
                repetition_penalty=1.0,
            )
            captions += [texts[0] for texts in per_image]
            bar.advance(len(batch))
    return captions


def score_captioning(
    captioner, data: RetrievalSet, config: EvaluateConfig, prompt: str, progress: bool = False
) -> dict:
    """COCO caption metrics of the captioner's captions of every distinct image of `data`."""
    from capfilt.training.caption_metrics import caption_metrics

    keys, images, references = distinct_images(data)
    captions = generate_captions(captioner, images, config, prompt, progress)
    scores = caption_metrics(
        dict(zip(keys, captions, strict=True)),
        dict(zip(keys, references, strict=True)),
        config.caption_metrics,
    )
    scores["decoding"] = dict(
        method="beam",
        num_beams=config.num_beams,
        min_length=config.min_length,
        max_length=config.max_length,
        prompt=prompt,
        precision="fp32",
        device=str(captioner.device),
    )
    return scores


def evaluate_model(
    model: str, dataset: str, config: EvaluateConfig, progress: bool = False
) -> EvaluationResult:
    """Retrieval recall@K (by ITC) and captioning scores of MODEL on DATASET, where it has
    the heads for them: a run, an export, a BLIP filter or a BLIP captioner."""
    import torch

    data = load_retrieval_set(dataset, config.caption_col, config.max_images)
    models = load_models(model, config)
    image_to_text = text_to_image = None
    if models.encoder is not None:
        image_feat, text_feat = itc_features(models.encoder, data, config.batch_size)
        similarity = image_feat @ text_feat.T  # (N images, M texts)
        gold = torch.zeros(similarity.shape, dtype=torch.bool)
        rows, cols = zip(*data.gold, strict=True)
        gold[list(rows), list(cols)] = True
        image_to_text = recall_at_k(similarity, gold)
        text_to_image = recall_at_k(similarity.T, gold.T)
    captioning = None
    if models.captioner is not None:
        prompt = models.prompt if config.prompt is None else config.prompt
        captioning = score_captioning(models.captioner, data, config, prompt, progress)
    return EvaluationResult(
        model=str(model),
        dataset=str(dataset),
        step=models.step,
        images=len(data.images),
        texts=len(data.texts),
        image_to_text=image_to_text,
        text_to_image=text_to_image,
        skipped=data.skipped,
        captioning=captioning,
        not_scored=models.not_scored,
    )
