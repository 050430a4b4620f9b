"""Duplicate groups from image hashes: who is a copy of whom, which copy stays, and why the
others go.

The images are the nodes of one graph (the dataset's, and those of the evaluation sets given
to `--against`); an edge joins two images that are

1. `exact`      the same bytes (SHA-256);
2. `pixels`     the same decoded pixels (another file of the same picture);
3. `perceptual` pHashes at most T bits apart, and mean colours within COLOR_TOLERANCE levels
                (pHash reads grey levels only: a red and a blue copy of one shape would match).
                Candidates come from pigeonhole bands: split the 64 bits into T + 1 bands; two
                hashes within T bits agree on at least one whole band, so only hashes that
                share a band value are compared (`phash_pairs`), never all pairs;
4. `semantic`   embeddings with cosine similarity ≥ 1 - eps (capfilt/dedup/semantic.py).

A duplicate group is a connected component. Before grouping, placeholders leave the graph:
an image whose copies (same bytes or pixels) sit under at least N sites, a blank image (its
grey levels hardly vary), or one on a list of known placeholder hashes — and every perceptual
near-copy of one. They are marked `placeholder` and none of them is kept. A group holding an
evaluation image is `contaminated`: none of its images is kept. Of every other group one image
is kept, the representative: the best filter score (its best caption's ITM), then the most
pixels, then the smallest key. Rows that are the same image as the representative listed
again under its URL (COCO's five captions of one picture) are kept with it. Every other image
of the group goes, with the first kind of link (1 → 4) that joins it to the representative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("exact", "pixels", "perceptual", "semantic")
# Perceptual matches differ by at most this much in mean red, green and blue (0-255):
# re-encoding, resizing and small crops move the mean colour by a few levels.
COLOR_TOLERANCE = 24
PLACEHOLDER, CONTAMINATED = "placeholder", "contaminated"
REASONS = (*KINDS, PLACEHOLDER, CONTAMINATED)
_DESCRIBE = {
    "exact": "same bytes as",
    "pixels": "same pixels as",
    "perceptual": "pHash near",
    "semantic": "embedding near",
}


@dataclass
class Nodes:
    """Every image the grouping sees, one entry per image (arrays of one length).

    `sha256`, `pixel_sha256`, `url`: codes (equal code, equal value; -1: none), `phash`:
    uint64 with `has_phash`, `color`: mean colour 0xRRGGBB (int64, where there is a pHash),
    `score`: best ITM (nan: none), `area`: pixels (0: unknown),
    `rank`: the key's place in key order, `domain`: site code (-1: none), `blank`/`listed`:
    placeholders by themselves, `source`: -1 for the dataset's images, else the index of the
    evaluation set."""

    keys: list
    sha256: np.ndarray
    pixel_sha256: np.ndarray
    phash: np.ndarray
    has_phash: np.ndarray
    color: np.ndarray
    url: np.ndarray
    domain: np.ndarray
    score: np.ndarray
    area: np.ndarray
    rank: np.ndarray
    blank: np.ndarray
    listed: np.ndarray
    source: np.ndarray
    pixel_std: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_eval(self) -> np.ndarray:
        return self.source >= 0


@dataclass
class Grouping:
    """The verdict on every node (arrays over the nodes; evaluation nodes are not judged)."""

    group: np.ndarray  # int64: the group's id (smallest node index of a dataset image in it)
    group_size: np.ndarray  # int64: dataset images in the group
    representative: np.ndarray  # int64 node index of the kept image, -1: none kept
    kept: np.ndarray  # bool
    reason: list  # None (kept) or one of REASONS
    detail: list  # a short explanation, or None
    against: np.ndarray  # int64: the evaluation image a contaminated one matches, -1: none
    counts: dict = field(default_factory=dict)  # edges found per kind, groups, ...


def codes(values) -> np.ndarray:
    """Equal values → equal int64 codes; None → -1 (pyarrow's hash table, fast for strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(values) if not isinstance(values, pa.Array | pa.ChunkedArray) else values
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    encoded = pc.dictionary_encode(array)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.indices.null_count:
        indices = np.where(encoded.indices.is_null().to_numpy(zero_copy_only=False), -1, indices)
    return indices.astype(np.int64)


def popcount64(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy ≥ 2.0
        return np.bitwise_count(values)
    as_bytes = values.astype(np.uint64).view(np.uint8).reshape(-1, 8)
    return _BYTE_BITS[as_bytes].sum(axis=1)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the T + 1 bands that split 64 bits as evenly as possible."""
    count = max_distance + 1
    widths = [64 // count + (1 if b < 64 % count else 0) for b in range(count)]
    out, shift = [], 0
    for width in widths:
        out.append((shift, width))
        shift += width
    return out


def phash_pairs(values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j, of the hashes `values` (uint64) at most `max_distance` bits apart.

    By the pigeonhole principle such a pair agrees on one of T + 1 bands: sorted by one band
    at a time, only neighbours within a run of equal band values are compared. The work is
    the sum over runs of their size squared: about n² / 2^(64 / (T + 1)) per band when hashes
    spread evenly, instead of n²."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    n = len(values)
    empty = np.empty(0, dtype=np.int64)
    if n < 2 or max_distance <= 0:
        return empty, empty
    found_i, found_j = [], []
    for shift, width in bands(min(max_distance, 63)):
        band = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(band, kind="stable")
        ordered, hashes = band[order], values[order]
        # Positions p whose next value, p + d, is in the same run; d grows until none is.
        active = np.flatnonzero(ordered[1:] == ordered[:-1])
        d = 1
        while active.size:
            near = popcount64(hashes[active] ^ hashes[active + d]) <= max_distance
            if near.any():
                found_i.append(order[active[near]])
                found_j.append(order[active[near] + d])
            d += 1
            active = active[active + d < n]
            active = active[ordered[active + d] == ordered[active]]
    if not found_i:
        return empty, empty
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    low, high = np.minimum(i, j), np.maximum(i, j)
    pair = np.unique(low.astype(np.int64) * n + high)  # a pair may share several bands
    return pair // n, pair % n


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest difference of red, green or blue between colours 0xRRGGBB."""
    channels = [((a >> shift) & 255) - ((b >> shift) & 255) for shift in (16, 8, 0)]
    return np.max(np.abs(np.stack(channels)), axis=0)


def perceptual_edges(nodes: Nodes, max_distance: int):
    """Edges between the nodes whose pHashes are within `max_distance` bits and whose mean
    colours are within COLOR_TOLERANCE: the search runs once per distinct (pHash, colour);
    nodes that share both are joined to the first of them."""
    empty = np.empty(0, dtype=np.int64)
    with_hash = np.flatnonzero(nodes.has_phash)
    if max_distance <= 0 or with_hash.size == 0:
        return [(empty, empty)], 0
    pairs = np.stack([nodes.phash[with_hash].view(np.int64), nodes.color[with_hash]])
    entries, inverse = np.unique(pairs, axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    same_entry = np.full(len(nodes), -1, dtype=np.int64)
    same_entry[with_hash] = inverse
    first = np.full(entries.shape[1], -1, dtype=np.int64)
    first[inverse[::-1]] = with_hash[::-1]  # the first node of each distinct entry
    i, j = phash_pairs(entries[0].view(np.uint64), max_distance)
    close = color_distance(entries[1][i], entries[1][j]) <= COLOR_TOLERANCE
    i, j = i[close], j[close]
    return [star_edges(same_entry), (first[i], first[j])], int(i.size)


def star_edges(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each node to the first node of its code (codes ≥ 0): one component per
    code with n - 1 edges, not n²."""
    nodes = np.flatnonzero(code >= 0)
    if nodes.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = nodes[np.argsort(code[nodes], kind="stable")]
    sorted_code = code[order]
    first = np.r_[True, sorted_code[1:] != sorted_code[:-1]]
    head = order[np.maximum.accumulate(np.where(first, np.arange(order.size), 0))]
    return head[~first], order[~first]


def components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected component label of each of n nodes under the union of `edges`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([e[0] for e in edges]) if edges else np.empty(0, np.int64)
    b = np.concatenate([e[1] for e in edges]) if edges else np.empty(0, np.int64)
    graph = coo_matrix((np.ones(a.size, dtype=np.int32), (a, b)), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _restrict(edges, keep: np.ndarray):
    """The edges whose both ends are kept."""
    out = []
    for a, b in edges:
        both = keep[a] & keep[b]
        out.append((a[both], b[both]))
    return out


def group_images(
    nodes: Nodes,
    phash_distance: int,
    placeholder_domains: int,
    semantic: tuple[np.ndarray, np.ndarray] | None = None,
    similarity=None,
    describe_key=None,
) -> Grouping:
    """Group `nodes` and judge each (see the module docstring).

    `semantic`: (i, j) node pairs of near-identical embeddings; `similarity(i, j)`: their
    cosine similarities, for the details. `describe_key(node)`: how a detail names an image
    (an evaluation image with its dataset)."""
    n = len(nodes)
    describe_key = describe_key or (lambda node: str(nodes.keys[node]))
    counts: dict = {}
    if n == 0:
        none = np.empty(0, dtype=np.int64)
        return Grouping(none, none, none, np.empty(0, dtype=bool), [], [], none, {"groups": 0})

    # --- edges of each kind ---------------------------------------------------------------
    edges = {"exact": [star_edges(nodes.sha256)], "pixels": [star_edges(nodes.pixel_sha256)]}
    edges["perceptual"], near_pairs = perceptual_edges(nodes, phash_distance)
    edges["semantic"] = [semantic] if semantic is not None else []
    counts["pairs"] = {
        "exact": int(edges["exact"][0][0].size),
        "pixels": int(edges["pixels"][0][0].size),
        "perceptual": near_pairs,
        "semantic": int(semantic[0].size) if semantic is not None else 0,
    }

    # --- placeholders, on the exact/pixel/perceptual graph of every image ------------------
    exact_or_pixels = components(n, edges["exact"] + edges["pixels"])
    near = components(n, edges["exact"] + edges["pixels"] + edges["perceptual"])
    dataset = ~nodes.is_eval
    sites = np.zeros(n, dtype=np.int64)  # distinct sites of the dataset copies of each image
    with_site = np.flatnonzero(dataset & (nodes.domain >= 0))
    if with_site.size:
        pairs = np.unique(np.stack([exact_or_pixels[with_site], nodes.domain[with_site]]), axis=1)
        np.add.at(sites, pairs[0], 1)
    by_sites = sites[exact_or_pixels] >= placeholder_domains
    why = np.full(n, "", dtype=object)
    why[by_sites] = [f"the same image under {s} sites" for s in sites[exact_or_pixels[by_sites]]]
    if nodes.pixel_std is not None:
        for node in np.flatnonzero(nodes.blank):
            why[node] = f"blank (grey levels spread {nodes.pixel_std[node]:.1f})"
    else:
        why[nodes.blank] = "blank"
    why[nodes.listed] = "on the list of known placeholders"
    placeholder_here = nodes.blank | nodes.listed | by_sites
    # A perceptual near-copy of a placeholder is one too ("image not found", resized).
    first_of_group = np.full(n, -1, dtype=np.int64)
    marked = np.flatnonzero(placeholder_here)
    first_of_group[near[marked][::-1]] = marked[::-1]
    placeholder = first_of_group[near] >= 0
    inherited = placeholder & ~placeholder_here
    why[inherited] = [
        f"near-duplicate of placeholder {describe_key(first_of_group[near[node]])}"
        for node in np.flatnonzero(inherited)
    ]

    # --- groups of the other images, one level per kind -------------------------------------
    active = ~placeholder
    levels, so_far = [], []
    for kind in KINDS:
        so_far += _restrict(edges[kind], active)
        levels.append(components(n, so_far))
    final = levels[-1]

    # Contaminated: the group holds an evaluation image (the first one is named).
    eval_of_group = np.full(n, -1, dtype=np.int64)
    evals = np.flatnonzero(nodes.is_eval & active)
    eval_of_group[final[evals][::-1]] = evals[::-1]
    against = np.where(active & dataset, eval_of_group[final], -1)
    contaminated = against >= 0

    # Representatives: best score, then most pixels, then smallest key.
    candidates = np.flatnonzero(dataset & active & ~contaminated)
    score = np.nan_to_num(nodes.score[candidates], nan=-np.inf)
    order = candidates[
        np.lexsort((nodes.rank[candidates], -nodes.area[candidates], -score, final[candidates]))
    ]
    best = np.full(n, -1, dtype=np.int64)
    best[final[order][::-1]] = order[::-1]
    representative = np.where(dataset & active & ~contaminated, best[final], -1)
    rep = np.maximum(representative, 0)
    same_listing = (
        (representative >= 0)
        & (nodes.url >= 0)
        & (nodes.url == nodes.url[rep])
        & (nodes.sha256 == nodes.sha256[rep])
    )
    kept = (representative == np.arange(n)) | same_listing

    # The group id: its smallest dataset node (placeholders: their near-copy group).
    group_of = np.where(placeholder, near + n, final)  # two label spaces, kept apart
    smallest = np.full(2 * n, n, dtype=np.int64)
    dataset_nodes = np.flatnonzero(dataset)
    np.minimum.at(smallest, group_of[dataset_nodes], dataset_nodes)
    group = np.where(dataset, smallest[group_of], -1)
    size = np.zeros(2 * n, dtype=np.int64)
    np.add.at(size, group_of[dataset_nodes], 1)
    group_size = np.where(dataset, size[group_of], 0)

    reason: list = [None] * n
    detail: list = [None] * n
    for node in np.flatnonzero(dataset & ~kept):
        if placeholder[node]:
            reason[node], detail[node] = PLACEHOLDER, why[node]
            continue
        if contaminated[node]:
            match = against[node]
            kind = _first_level(levels, node, match)
            reason[node] = CONTAMINATED
            detail[node] = f"{kind}: {_DESCRIBE[kind]} {describe_key(match)}"
            continue
        other = representative[node]
        kind = _first_level(levels, node, other)
        reason[node] = kind
        detail[node] = f"{_DESCRIBE[kind]} {describe_key(other)}"
        if kind == "perceptual":
            bits = int(popcount64(np.array([nodes.phash[node] ^ nodes.phash[other]]))[0])
            detail[node] += f" ({bits} bits apart)" if nodes.has_phash[node] else ""
        elif kind == "semantic" and similarity is not None:
            cosine = similarity(np.array([node]), np.array([other]))
            if cosine is not None:
                detail[node] += f" (cosine {float(cosine[0]):.3f})"
    counts["groups"] = int(np.unique(group[dataset_nodes]).size) if dataset_nodes.size else 0
    return Grouping(group, group_size, representative, kept, reason, detail, against, counts)


def _first_level(levels: list[np.ndarray], a: int, b: int) -> str:
    """The first kind of link (exact → semantic) that puts nodes a and b in one group."""
    for kind, labels in zip(KINDS, levels, strict=True):
        if labels[a] == labels[b]:
            return kind
    return KINDS[-1]
