"""Approximate nearest neighbours for the map, in numpy: fast, deterministic, no JIT.

UMAP needs each point's k nearest neighbours. umap-learn finds them with NN-descent, which
pays numba compilation in every new process and runs on one core when seeded. Here: an
inverted-file search (k-means cells; each cell is searched against the cells nearest to
it) made of blocked matrix products that BLAS runs on every core. On 50k clustered
points in 50 dimensions it finds 99.8% of the exact neighbours in ~1.4 s on 2 cores,
against ~3.5 s for seeded NN-descent. numpy rather than torch: the map worker then
never imports torch, which would cost it 2 s of CPU that training needs.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["approximate_knn"]

# Below this many points the exact search is cheaper than building cells.
EXACT_KNN_POINTS = 8192
# Cells searched per query cell (out of ~sqrt(N)).
PROBES = 16
# Values in one distance block (float32): bounds the search's memory at ~64 MB.
BLOCK_VALUES = 1 << 24


def approximate_knn(
    points: np.ndarray, k: int, seed: int = 0, probes: int = PROBES
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``k`` nearest other points (Euclidean): ``(N, k)`` indices, distances.

    Exact below :data:`EXACT_KNN_POINTS`; above, about sqrt(N) k-means cells, each
    searched against the ``probes`` cells nearest to it (itself included). Where fewer
    than ``k`` others are found the rest are index -1 at distance inf (umap-learn's
    convention for a missing neighbour).
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    n = len(points)
    if n <= EXACT_KNN_POINTS:
        ids = np.arange(n)
        return _block_knn(points, ids, points, ids, k)
    cells = max(16, int(math.sqrt(n)))
    centroids, assignment = _kmeans(points, cells, np.random.default_rng(seed))
    between = _squared_distances(centroids, centroids)
    near_cells = np.argsort(between, axis=1, kind="stable")[:, : min(probes, cells)]
    order = np.argsort(assignment, kind="stable")
    counts = np.bincount(assignment, minlength=cells)
    starts = np.cumsum(counts) - counts
    members = [order[s : s + c] for s, c in zip(starts.tolist(), counts.tolist(), strict=True)]
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for cell in range(cells):
        queries = members[cell]
        if len(queries) == 0:
            continue
        candidates = np.concatenate([members[c] for c in near_cells[cell]])
        found, dist = _block_knn(points[queries], queries, points[candidates], candidates, k)
        indices[queries], distances[queries] = found, dist
    return indices, distances


def _block_knn(
    queries: np.ndarray,
    query_ids: np.ndarray,
    candidates: np.ndarray,
    candidate_ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest candidates of each query, excluding the query itself, nearest first."""
    k_found = max(0, min(k, len(candidates) - 1))
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    if k_found == 0:
        return indices, distances
    rows = max(1, BLOCK_VALUES // max(1, len(candidates)))
    candidate_norms = np.einsum("ij,ij->i", candidates, candidates)
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows]
        d2 = _squared_distances(block, candidates, candidate_norms)
        if query_ids is candidate_ids:  # the exact search: each query is its own row
            d2[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        else:
            d2[query_ids[start : start + rows, None] == candidate_ids[None, :]] = np.inf
        nearest = np.argpartition(d2, k_found - 1, axis=1)[:, :k_found]
        values = np.take_along_axis(d2, nearest, axis=1)
        by_distance = np.argsort(values, axis=1, kind="stable")
        nearest = np.take_along_axis(nearest, by_distance, axis=1)
        values = np.take_along_axis(values, by_distance, axis=1)
        indices[start : start + len(block), :k_found] = candidate_ids[nearest]
        distances[start : start + len(block), :k_found] = np.sqrt(np.maximum(values, 0))
    return indices, distances


def _squared_distances(
    a: np.ndarray, b: np.ndarray, b_norms: np.ndarray | None = None
) -> np.ndarray:
    if b_norms is None:
        b_norms = np.einsum("ij,ij->i", b, b)
    d2 = a @ b.T
    d2 *= -2
    d2 += b_norms[None, :]
    d2 += np.einsum("ij,ij->i", a, a)[:, None]
    return d2


def _kmeans(
    points: np.ndarray, cells: int, rng: np.random.Generator, iterations: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from a random sample of the points; empty cells keep their centre."""
    centroids = points[rng.permutation(len(points))[:cells]].copy()
    for _ in range(iterations):
        assignment = _nearest_centroid(points, centroids)
        order = np.argsort(assignment, kind="stable")
        counts = np.bincount(assignment, minlength=cells)
        filled = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[filled]
        sums = np.add.reduceat(points[order], starts, axis=0)
        centroids[filled] = sums / counts[filled, None].astype(np.float32)
    return centroids, _nearest_centroid(points, centroids)


def _nearest_centroid(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    rows = max(1, BLOCK_VALUES // len(centroids))
    centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
    return np.concatenate(
        [
            (centroid_norms[None, :] - 2 * block @ centroids.T).argmin(1)
            for block in np.array_split(points, range(rows, len(points), rows))
        ]
    )
