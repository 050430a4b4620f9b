"""A small scored dataset with truth columns, written without running any model.

`write_scored_dataset` builds images/ with tests/conftest.py's `write_images_dataset`, marks
some web captions wrong as the toy web does (`true_caption`, `caption_is_wrong`,
`wrong_kind`), and writes hand-set captions/, scores/ and curated/ shards so that reports,
exports and SQL can be checked against figures known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

THRESHOLD = 0.5
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'
BAD_KEY = "000010002"  # its bytes are not an image: captions fail, nothing is scored
DUPLICATE = ("000000000", "000010000")  # the same image bytes under two keys

# Row i of a shard → (wrong_kind or None, web ITM); rows 4 and 9 are failed downloads.
WEB_PLAN = {
    0: (None, 0.92),
    1: ("color", 0.12),
    2: (None, 0.81),
    3: ("unrelated", 0.05),
    5: (None, 0.44),
    6: ("shape", 0.63),
    7: (None, 0.51),
    8: (None, 0.49),
}
# Shard 1 catches its shape-swapped caption (ITM 0.30) where shard 0 misses it (0.63).
SHARD_OVERRIDES = {(1, 6): 0.30}


def synthetic_itm(i: int, caption_id: int) -> float:
    return (0.75 if i % 2 == 0 else 0.58) if caption_id == 0 else round(0.2 + 0.05 * i, 2)


@dataclass
class ScoredDataset:
    root: str
    threshold: float
    web: dict = field(default_factory=dict)  # key -> (is_wrong, itm)
    synthetic: dict = field(default_factory=dict)  # (key, caption_id) -> itm
    success_keys: list = field(default_factory=list)

    def expected_truth(self, threshold: float) -> dict:
        wrong = sum(1 for is_wrong, _ in self.web.values() if is_wrong)
        dropped = sum(1 for _, itm in self.web.values() if itm < threshold)
        caught = sum(1 for is_wrong, itm in self.web.values() if is_wrong and itm < threshold)
        return {"wrong": wrong, "dropped": dropped, "caught": caught}

    def kept(self, threshold: float) -> list[tuple[str, int, str]]:
        """(key, text_id, source) of every pair at or above `threshold`."""
        pairs = [(k, 0, "web") for k, (_, itm) in self.web.items() if itm >= threshold]
        pairs += [
            (k, c + 1, "synthetic") for (k, c), itm in self.synthetic.items() if itm >= threshold
        ]
        return sorted(pairs)


def _wrong_caption(color: str, shape: str, kind: str, i: int) -> str:
    from conftest import COLORS, SHAPES

    if kind == "color":
        other = [c for c in COLORS if c != color][i % 3]
        return f"a {other} {shape}"
    if kind == "shape":
        other = [s for s in SHAPES if s != shape][i % 2]
        return f"a {color} {other}"
    return HOSTILE


def write_scored_dataset(
    root, threshold: float = THRESHOLD, stages=("captions", "scores", "curated")
):
    """Write the dataset at `root`; `stages` picks which stages after images/ exist."""
    import pyarrow as pa
    from conftest import write_images_dataset

    from capfilt.core import parquet as io
    from capfilt.core.layout import Dataset

    root = str(root)
    write_images_dataset(root, n_shards=2, per_shard=10, seed=3, bad_keys=(BAD_KEY,))
    ds = Dataset(root)
    result = ScoredDataset(root=root, threshold=threshold)
    duplicate_bytes = None
    for shard in range(2):
        table = ds.read_shard("images", shard).to_pylist()
        captions, scores = [], []
        for i, row in enumerate(table):
            row["true_caption"], row["caption_is_wrong"], row["wrong_kind"] = None, None, None
            if row["status"] != "success":
                if (shard, i) == (1, 9):
                    row["error_message"] = "<urlopen error [Errno 111] Connection refused>"
                continue
            key = row["key"]
            result.success_keys.append(key)
            _, color, shape = row["caption"].split(" ")
            row["true_caption"] = row["caption"]
            kind, web_itm = WEB_PLAN[i]
            web_itm = SHARD_OVERRIDES.get((shard, i), web_itm)
            row["caption_is_wrong"] = kind is not None
            row["wrong_kind"] = kind
            if kind:
                row["caption"] = _wrong_caption(color, shape, kind, i)
            if key == DUPLICATE[0]:
                duplicate_bytes = (row["jpg"], row["sha256"])
            if key == DUPLICATE[1]:
                row["jpg"], row["sha256"] = duplicate_bytes
            if key == BAD_KEY:
                for c in range(2):
                    captions.append(
                        dict(
                            key=key,
                            caption_id=c,
                            text=None,
                            model="tiny",
                            status="error",
                            error_message="cannot identify image file",
                        )
                    )
                continue
            result.web[key] = (kind is not None, web_itm)
            scores.append(
                dict(
                    key=key,
                    text_id=0,
                    source="web",
                    text=row["caption"],
                    itm_score=web_itm,
                    itc_score=web_itm / 2,
                    model="tiny-filter",
                )
            )
            for c in range(2):
                text = f"a photo of a {color} {shape}" if c == 0 else f"a {shape} thing"
                itm = synthetic_itm(i, c)
                result.synthetic[(key, c)] = itm
                captions.append(
                    dict(
                        key=key,
                        caption_id=c,
                        text=text,
                        model="tiny",
                        status="success",
                        error_message=None,
                    )
                )
                scores.append(
                    dict(
                        key=key,
                        text_id=c + 1,
                        source="synthetic",
                        text=text,
                        itm_score=itm,
                        itc_score=itm / 2,
                        model="tiny-filter",
                    )
                )
        images = pa.Table.from_pylist(table)
        ds.write_shard("images", shard, images)
        if "captions" in stages:
            ds.write_shard("captions", shard, io.rows_to_table(captions, io.CAPTIONS_SCHEMA))
        if "scores" in stages:
            ds.write_shard("scores", shard, io.rows_to_table(scores, io.SCORES_SCHEMA))
        if "curated" in stages:
            kept = [
                {k: s[k] for k in io.CURATED_SCHEMA.names}
                for s in scores
                if s["itm_score"] >= threshold
            ]
            folder = ds.generation_folder("curated", 1)
            ds.fs.makedirs(folder.path, exist_ok=True)
            io.write_table_atomic(
                ds.fs, folder.shard_path(shard), io.rows_to_table(kept, io.CURATED_SCHEMA)
            )
    if "curated" in stages:  # as a filter run switches its generation in
        ds.switch_generation("curated", 1, {"stage": "curate", "options": {"threshold": threshold}})
    if "scores" in stages:
        ds.record_run("filter", {"threshold": threshold}, {"pairs": len(result.web)})
    return result
