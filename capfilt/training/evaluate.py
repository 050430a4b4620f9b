"""`capfilt evaluate MODEL DATASET`: image-text retrieval recall of a trained model.

MODEL is a capfilt run folder (pretrain or finetune), an export folder, or a BLIP ITM
checkpoint (its ITC heads are used).

Both directions rank by ITC similarity (cosine of the projected unimodal features), as
BLIP's first retrieval stage does:

    image → text   for each image, rank every distinct text of the dataset
    text → image   for each distinct text, rank every image

Web datasets repeat texts ("stock photo") and COCO gives an image five captions, so a hit
is any pair the dataset holds: an image's gold texts are the texts of its rows, and a text's
gold images are the images it is the caption of. Identical texts are ranked once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from capfilt.core.errors import CapfiltError
from capfilt.core.options import Options, option

KS = (1, 5, 10)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Options):
    """Options of one retrieval evaluation."""

    caption_col: str = option(
        "caption", "Column of images/ with the reference texts (e.g. true_caption)."
    )
    batch_size: int = option(64, "Images or texts per forward pass.", ge=1)
    max_images: int | None = option(None, "Evaluate on the first N usable images only.", ge=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")


@dataclass
class RetrievalResult:
    model: str
    dataset: str
    step: int | None  # of a capfilt run's checkpoint; None for a BLIP checkpoint
    images: int
    texts: int
    image_to_text: dict[str, float]  # "R@1" → fraction of images with a gold text in the top 1
    text_to_image: dict[str, float]
    skipped: dict[str, int] = field(default_factory=dict)

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
            index = text_of.setdefault(text, len(result.texts))
            if index == len(result.texts):
                result.texts.append(text)
            result.gold.add((image, index))
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


def load_encoder(model: str, device: str = "auto"):
    """A capfilt run folder, an export folder (its filter/), or a BLIP ITM checkpoint."""
    from pathlib import Path

    from capfilt.training.runs import METADATA, find_checkpoint

    path = Path(model)
    if find_checkpoint(path) is not None:
        return RunEncoder(model, device)
    if (path / "filter" / "config.json").is_file():
        return FilterEncoder(str(path / "filter"), device)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CapfiltError(
            f"{model!r} has no complete checkpoint (step-N/{METADATA}) and no BLIP config.json; "
            "pass a folder written by `capfilt pretrain`/`finetune`/`export` or a BLIP filter"
        )
    return FilterEncoder(model, device)


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


def evaluate_retrieval(model: str, dataset: str, config: EvaluateConfig) -> RetrievalResult:
    """Image→text and text→image recall@K of MODEL (run, export or BLIP filter) on DATASET."""
    import torch

    encoder = load_encoder(model, config.device)
    data = load_retrieval_set(dataset, config.caption_col, config.max_images)
    image_feat, text_feat = itc_features(encoder, data, config.batch_size)
    similarity = image_feat @ text_feat.T  # (N images, M texts)
    gold = torch.zeros(similarity.shape, dtype=torch.bool)
    rows, cols = zip(*data.gold, strict=True)
    gold[list(rows), list(cols)] = True
    return RetrievalResult(
        model=str(model),
        dataset=str(dataset),
        step=encoder.step,
        images=len(data.images),
        texts=len(data.texts),
        image_to_text=recall_at_k(similarity, gold),
        text_to_image=recall_at_k(similarity.T, gold.T),
        skipped=data.skipped,
    )
