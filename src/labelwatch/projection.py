"""2-D maps of the validation embeddings: UMAP after a PCA pre-reduction, PCA as fallback."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np

__all__ = ["ProjectionMethod", "project"]

log = logging.getLogger(__name__)

ProjectionMethod = Literal["umap", "pca", "none"]
PROJECTION_METHODS: tuple[str, ...] = ("umap", "pca", "none")

# Below this many points UMAP's neighbour graph is too thin to mean much: use PCA.
MIN_UMAP_POINTS = 16
# UMAP works on at most this many dimensions; PCA first is faster and loses little.
PCA_DIMENSIONS = 50


def project(
    embeddings: np.ndarray, *, method: ProjectionMethod = "umap", seed: int = 0
) -> tuple[np.ndarray, str]:
    """Map ``(N, D)`` embeddings to ``(N, 2)`` coordinates.

    Returns the coordinates and the method actually used: ``"umap"`` falls back to
    ``"pca"`` below :data:`MIN_UMAP_POINTS` points. ``"none"`` gives NaN coordinates.
    Deterministic for a given ``seed``.
    """
    if method not in PROJECTION_METHODS:
        raise ValueError(f"`projection` must be one of {PROJECTION_METHODS}, got {method!r}")
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    if method == "none" or len(embeddings) == 0:
        return np.full((len(embeddings), 2), np.nan), "none"
    if method == "umap" and len(embeddings) >= MIN_UMAP_POINTS:
        return _umap(_pca(embeddings, PCA_DIMENSIONS), seed), "umap"
    return _pca(embeddings, 2), "pca"


def _pca(embeddings: np.ndarray, dimensions: int) -> np.ndarray:
    """Top principal components (zero-padded when there are fewer than asked for)."""
    n, d = embeddings.shape
    if d <= dimensions and dimensions != 2:
        return embeddings
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    # Economy SVD on the smaller side; signs fixed so the map does not flip between runs.
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:dimensions]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    reduced = centred @ (components * signs[:, None]).T
    if reduced.shape[1] < dimensions:
        reduced = np.pad(reduced, ((0, 0), (0, dimensions - reduced.shape[1])))
    return reduced.astype(np.float32)


def _umap(embeddings: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError as err:  # pragma: no cover - a core dependency
        raise ImportError("projection='umap' needs umap-learn: pip install umap-learn") from err
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(15, len(embeddings) - 1),
        random_state=seed,
        # Approximate neighbours are ~6x faster than the exact path below 4096 points.
        force_approximation_algorithm=True,
    )
    with warnings.catch_warnings():
        # random_state disables parallelism: expected, since we ask for determinism.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
        return np.asarray(reducer.fit_transform(embeddings), dtype=np.float64)
