"""The map's neighbour search: exact where small, near-exact above, deterministic."""

from __future__ import annotations

import numpy as np
import torch

from labelwatch.ann import EXACT_KNN_POINTS, approximate_knn
from labelwatch.projection import epochs_for


def _brute_force(points: np.ndarray, k: int) -> np.ndarray:
    """Exact neighbours in float64 (torch as the reference), 1000 rows at a time."""
    points = torch.from_numpy(points)
    found = []
    for start in range(0, len(points), 1000):
        distances = torch.cdist(points[start : start + 1000].double(), points.double())
        rows = torch.arange(len(distances))
        distances[rows, rows + start] = float("inf")
        found.append(distances.topk(k, largest=False).indices)
    return torch.cat(found).numpy()


def _clusters(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(30, d))
    return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_small_sets_get_the_exact_neighbours_without_themselves():
    points = _clusters(500)
    indices, distances = approximate_knn(points, 7)
    expected = _brute_force(points, 7)
    assert indices.shape == distances.shape == (500, 7)
    assert (indices != np.arange(500)[:, None]).all()
    np.testing.assert_array_equal(np.sort(indices, 1), np.sort(expected, 1))
    exact = np.linalg.norm(points[:, None, :] - points[indices], axis=2)
    np.testing.assert_allclose(distances, exact, atol=1e-4, rtol=1e-4)
    assert (distances[:, 1:] >= distances[:, :-1]).all()  # nearest first


def test_large_sets_find_almost_all_exact_neighbours_deterministically():
    """Above EXACT_KNN_POINTS the cell search is used: checked against brute force."""
    n = EXACT_KNN_POINTS + 2000
    points = _clusters(n)
    indices, _ = approximate_knn(points, 10, seed=1)
    expected = _brute_force(points, 10)
    found = [len(set(a) & set(b)) for a, b in zip(indices.tolist(), expected.tolist(), strict=True)]
    assert np.mean(found) / 10 >= 0.95
    again, _ = approximate_knn(points, 10, seed=1)
    np.testing.assert_array_equal(indices, again)


def test_missing_neighbours_are_marked_like_umap_learn_does():
    """Fewer points than k: the rest are index -1 at distance inf (umap-learn skips them)."""
    indices, distances = approximate_knn(_clusters(4), 6)
    assert (indices[:, :3] >= 0).all() and (indices[:, 3:] == -1).all()
    assert np.isinf(distances[:, 3:]).all() and np.isfinite(distances[:, :3]).all()


def test_epochs_fit_the_size():
    """Full epochs up to 10k points, fewer above (never below the floors), warm < cold."""
    assert epochs_for(3_000, warm=False) == epochs_for(10_000, warm=False) == 200
    assert epochs_for(50_000, warm=False) == 40 and epochs_for(1_000_000, warm=False) == 40
    assert epochs_for(3_000, warm=True) == 30 and epochs_for(50_000, warm=True) == 15
    sizes = [1_000, 10_000, 20_000, 50_000]
    assert all(
        epochs_for(a, False) >= epochs_for(b, False) for a, b in zip(sizes, sizes[1:], strict=False)
    )
