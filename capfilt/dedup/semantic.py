"""Semantic near-duplicates as SemDeDup finds them (Abbas et al., 2023): cluster the
embeddings with k-means, then within each cluster join the pairs whose cosine similarity is
at least 1 - eps. Comparing inside clusters only makes the work about n × (n / k) instead of
n²; a pair split across two clusters is missed, which at eps ≈ 0.05 is rare (near-identical
embeddings sit in one cluster almost always).

Embeddings arrive as float16 (N, D) and are converted and normalised a chunk or a cluster at
a time, so memory stays near the float16 array itself. faiss does the k-means (spherical, on
a sample of 64 points per cluster), the assignment and each cluster's range search, on as many
threads as OpenMP is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_PER_CLUSTER = 64  # k-means trains on at most this many points per centroid
CLUSTER_SIZE = 1000  # the automatic number of clusters aims at this many points per cluster
_CHUNK = 1 << 16  # rows normalised at a time for the assignment
BORDER = 0.05  # rows this close (cosine) to another centroid are searched there too
PROBES = 3  # ... to at most this many nearest centroids in all


@dataclass
class SemanticPairs:
    """Pairs (i, j), i < j, of rows with cosine similarity ≥ threshold, and what it took."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray
    clusters: int
    largest_cluster: int


def auto_clusters(n: int) -> int:
    """k for n embeddings: about CLUSTER_SIZE points per cluster, and enough points per
    centroid for k-means to place it (at least 40)."""
    return int(max(1, min(round(n / CLUSTER_SIZE), n // 40)))


def normalized(rows) -> np.ndarray:
    """float32 copy of `rows` with unit L2 norm (zero rows stay zero)."""
    x = np.asarray(rows, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def kmeans_labels(
    embeddings: np.ndarray, clusters: int, seed: int = 0, iterations: int = 20, probes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(the `probes` nearest centroids of each row, nearest first (N, probes); how much less
    similar each is than the nearest (N, probes)): spherical k-means trained on a seeded
    sample, every row then assigned by inner product."""
    import faiss

    n, dim = embeddings.shape
    if clusters <= 1 or n <= 1:
        return np.zeros((n, 1), dtype=np.int64), np.zeros((n, 1), dtype=np.float32)
    clusters = min(clusters, n)
    probes = max(1, min(probes, clusters))
    rng = np.random.default_rng(seed)
    size = min(n, clusters * SAMPLE_PER_CLUSTER)
    sample = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    kmeans = faiss.Kmeans(
        dim,
        clusters,
        niter=iterations,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,  # a small set is fine: no warning on stderr
        max_points_per_centroid=SAMPLE_PER_CLUSTER,
    )
    kmeans.train(normalized(embeddings[sample]))
    index = faiss.IndexFlatIP(dim)
    index.add(kmeans.centroids)
    nearest = np.empty((n, probes), dtype=np.int64)
    gap = np.empty((n, probes), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        similarity, found = index.search(normalized(embeddings[start : start + _CHUNK]), probes)
        nearest[start : start + _CHUNK] = found
        gap[start : start + _CHUNK] = similarity[:, :1] - similarity
    return nearest, gap


def cluster_pairs(vectors: np.ndarray, threshold: float, queries: np.ndarray | None = None):
    """(i, j, similarity) of the unit rows of one cluster at or above `threshold`, i < j; with
    `queries`, of each query row i against the cluster's rows j instead."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    asked = vectors if queries is None else queries
    # range_search keeps similarities strictly above the radius.
    limits, similarity, neighbour = index.range_search(asked, float(threshold) - 1e-6)
    row = np.repeat(np.arange(len(asked)), np.diff(limits.astype(np.int64)))
    neighbour = neighbour.astype(np.int64)
    keep = similarity >= threshold
    if queries is None:
        keep &= neighbour > row
    return row[keep], neighbour[keep], similarity[keep]


def semantic_pairs(
    embeddings: np.ndarray,
    eps: float,
    clusters: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    border: float = BORDER,
    probes: int = PROBES,
) -> SemanticPairs:
    """SemDeDup's pairs of `embeddings` (N, D): same k-means cluster, cosine ≥ 1 - eps.

    A near-copy across a cluster border is found too when the row sits near that border: a
    row whose second-nearest centroid is within `border` (cosine) of its nearest is also
    compared with the second cluster's rows (as a query only, so the cost grows by those rows,
    not quadratically)."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    n = len(embeddings)
    k = auto_clusters(n) if clusters is None else max(1, min(clusters, n))
    nearest, gap = kmeans_labels(embeddings, k, seed, probes=probes)
    labels = nearest[:, 0]
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    # Guests: (row, another cluster near it), grouped by that cluster.
    guest_row, guest_probe = np.nonzero((gap[:, 1:] <= border) & (nearest[:, 1:] >= 0))
    guest_cluster = nearest[guest_row, guest_probe + 1]
    by_cluster = np.argsort(guest_cluster, kind="stable")
    border_order, border_labels = guest_row[by_cluster], guest_cluster[by_cluster]
    threshold = 1.0 - eps
    found_i, found_j, found_s = [], [], []
    largest = 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        members = order[start:end]  # ascending: rows read in file order
        largest = max(largest, members.size)
        vectors = normalized(embeddings[members])
        if members.size >= 2:
            i, j, s = cluster_pairs(vectors, threshold)
            found_i.append(members[i])
            found_j.append(members[j])
            found_s.append(s)
        label = labels[members[0]]
        lo, hi = np.searchsorted(border_labels, [label, label + 1])
        if hi > lo:
            guests = border_order[lo:hi]
            i, j, s = cluster_pairs(vectors, threshold, normalized(embeddings[guests]))
            found_i.append(guests[i])
            found_j.append(members[j])
            found_s.append(s)
    if not found_i:
        empty = np.empty(0, dtype=np.int64)
        return SemanticPairs(empty, empty, np.empty(0, np.float32), k, largest)
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low * n + high, return_index=True)  # found from both sides
    return SemanticPairs(low[first], high[first], s[first], k, int(largest))


def cosine(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows i[k] and j[k]."""
    a, b = normalized(embeddings[i]), normalized(embeddings[j])
    return (a * b).sum(axis=1)
