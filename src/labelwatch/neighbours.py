"""Label agreement among nearest neighbours in an embedding space: pure torch functions.

A sample whose given label disagrees with the labels of the samples the model embeds next
to it is a likely label error, whatever the classification head says. These functions
find each sample's ``k`` nearest neighbours by cosine similarity, in row chunks so memory
stays ``O(chunk_size x N)`` (never ``N x N``), on the device of the embeddings (the GPU
when the model is there).

Neighbours are chosen deterministically: the ``k`` most similar samples, and among equal
similarities the lower index first, so results do not depend on ``chunk_size`` or on the
order in which a ``topk`` kernel happens to return ties.

A row without a direction (:func:`has_direction`: NaN or infinite values, or all zero)
is similar to nothing: it is neither searched for nor found. Its neighbour indices are
-1, its agreement and label distribution NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "approximate_neighbours",
    "has_direction",
    "knn_agreement",
    "knn_label_distribution",
    "knn_neighbours",
    "label_agreement",
    "label_distribution",
    "neighbour_labels",
]

# Values of the chunk x N similarity block when `chunk_size` is None: at most 2**24 float32
# (64 MB), and for smaller inputs about as many values as the embeddings themselves hold,
# so the block never dominates memory; never under 2**20 (a GEMM still large enough).
_AUTO_CHUNK_VALUES = 1 << 24
_MIN_CHUNK_VALUES = 1 << 20


def knn_agreement(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 10,
    chunk_size: int | None = None,
    exclude_self: bool = True,
) -> torch.Tensor:
    """Fraction of each sample's ``k`` nearest neighbours that carry its given label.

    Args:
        embeddings: ``(N, D)`` floating-point embeddings; cosine similarity is used (rows are
            L2-normalised). A row with NaN or infinite values, or all zero, has no
            neighbours and is nobody's neighbour.
        labels: ``(N,)`` integer class indices (the given, possibly noisy labels), ``>= 0``.
        k: neighbours per sample, ``>= 1``; when ``k`` exceeds the candidates available
            (``N - 1`` with ``exclude_self``, else ``N``) every candidate is a neighbour.
        chunk_size: rows whose similarities are computed at once (memory ``chunk_size x N``);
            None picks it so a block holds about 16M values (64 MB in float32).
        exclude_self: leave each sample out of its own neighbours (the usual case).

    Returns:
        ``(N,)`` float32 tensor on the embeddings' device, in [0, 1]; lower = the
        neighbourhood disagrees with the given label = more likely mislabelled. With no
        candidate neighbours (``N == 1`` and ``exclude_self``) the agreement is 1; NaN for
        a row without neighbours (see ``embeddings``).

    Raises:
        ValueError: for inputs of the wrong shape, dtype or range, or bad ``k``/``chunk_size``.
    """
    embeddings, labels, k, chunk_size = _check(embeddings, labels, k, chunk_size)
    if exclude_self and len(labels) < 2:  # no neighbour to contradict the label
        return torch.ones(len(labels), dtype=torch.float32, device=embeddings.device)
    neighbours = _directed_neighbours(embeddings, k, chunk_size, exclude_self)
    return label_agreement(neighbour_labels(labels, neighbours), labels, int(labels.max()) + 1)


def knn_label_distribution(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    k: int = 10,
    chunk_size: int | None = None,
    exclude_self: bool = True,
) -> torch.Tensor:
    """Fraction of each sample's ``k`` nearest neighbours in each class.

    Same neighbours as :func:`knn_agreement` (whose value is this distribution at the
    given label). Rows sum to 1, so the result can be mixed with a model's probabilities.

    Args:
        embeddings, labels, k, chunk_size, exclude_self: as in :func:`knn_agreement`.
        num_classes: ``C``, the number of columns; defaults to ``labels.max() + 1``.

    Returns:
        ``(N, C)`` float32 tensor on the embeddings' device, each entry in [0, 1] and each
        row summing to 1 (the uniform row when a sample has no candidate neighbours); a row
        of NaN for a row without neighbours (see :func:`knn_agreement`).

    Raises:
        ValueError: as :func:`knn_agreement`, and when a label is ``>= num_classes``.
    """
    embeddings, labels, k, chunk_size = _check(embeddings, labels, k, chunk_size)
    needed = int(labels.max()) + 1 if len(labels) else 1
    if num_classes is None:
        num_classes = needed
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < needed:
        raise ValueError(
            f"`num_classes` must be an integer > every label (>= {needed}), got {num_classes!r}"
        )
    neighbours = _directed_neighbours(embeddings, k, chunk_size, exclude_self)
    return label_distribution(neighbour_labels(labels, neighbours), num_classes)


def knn_neighbours(
    embeddings: torch.Tensor,
    *,
    k: int = 10,
    chunk_size: int | None = None,
    exclude_self: bool = True,
) -> torch.Tensor:
    """Indices of each sample's ``k`` nearest neighbours (cosine), most similar first.

    The neighbours :func:`knn_agreement` and :func:`knn_label_distribution` count. Kept as
    ``N x k`` indices, they give any row's label distribution later
    (:func:`label_distribution`) without an ``N x C`` array.

    Args:
        embeddings, k, chunk_size, exclude_self: as in :func:`knn_agreement`.

    Returns:
        ``(N, min(k, candidates))`` int64 tensor on the embeddings' device, the candidates
        being the rows with a direction (:func:`has_direction`); a row without one has
        no neighbours, all -1 (as has every row when no row has a candidate).
    """
    embeddings, k, chunk_size = _check_embeddings(embeddings, k, chunk_size)
    return _directed_neighbours(embeddings, k, chunk_size, exclude_self)


def approximate_neighbours(embeddings: torch.Tensor, *, k: int = 10, seed: int = 0) -> torch.Tensor:
    """:func:`knn_neighbours` by the map's inverted-file search (:mod:`labelwatch.ann`) on
    L2-normalised rows, whose Euclidean order is the cosine order: on a CPU above 8192
    points several times faster than the exact search, finding (nearly) every exact
    neighbour (``python benchmarks/knn.py``). Rows where it found fewer than ``k``
    neighbours get exact ones.

    Returns:
        ``(N, min(k, candidates))`` int64 tensor on the CPU, -1 rows as in
        :func:`knn_neighbours`.
    """
    points = embeddings.detach().float().cpu()
    return _among_directed(points, lambda rows: _approximate_neighbours(rows, k, seed))


def _approximate_neighbours(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    from labelwatch.ann import approximate_knn

    points = points / points.norm(dim=1, keepdim=True).clamp(min=1e-12)
    k = min(k, len(points) - 1)
    if k < 1:
        return torch.empty(len(points), 0, dtype=torch.long)
    if _largest_duplicate_share(points) > _MAX_DUPLICATE_SHARE:
        # many identical rows (a collapsed layer) make one giant cell, searched whole:
        # slower than the exact search
        return knn_neighbours(points, k=k).cpu()
    found, _ = approximate_knn(points.numpy(), k, seed=seed)
    neighbours = torch.from_numpy(found.astype(np.int64))
    short = (neighbours < 0).any(dim=1).nonzero().squeeze(1)
    if len(short):  # a thin cell: search those rows exactly
        sim = points[short] @ points.T
        sim[torch.arange(len(short)), short] = -torch.inf
        neighbours[short] = sim.topk(k, dim=1).indices
    return neighbours


# Above this share of identical rows approximate_neighbours searches exactly: they fill one
# cell that is searched whole (benchmarks/knn.py: with 30% identical rows the approximate
# search is still faster, with 60% it is not; all-zero rows, measured there, are now left
# out of the search before).
_MAX_DUPLICATE_SHARE = 0.4


def _largest_duplicate_share(points: torch.Tensor) -> float:
    """About the share of the rows that equal the most common row, from a fingerprint of
    each row (its sum, first and last values): rows that differ rarely share one, and a
    shared one only makes the search exact."""
    fingerprints = torch.stack([points.sum(dim=1), points[:, 0], points[:, -1]], dim=1)
    _, counts = torch.unique(fingerprints, dim=0, return_counts=True)
    return float(counts.max()) / len(points)


def has_direction(embeddings: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the rows that cosine similarity can compare, finite and not all zero.

    A NaN or infinite value (a float16 overflow above 65504, say) leaves a row no
    direction, and so does zero norm (dead units, a silent clip): such a row is
    similar to nothing, and its nearest neighbours would be whichever samples come
    first. Row maxima and minima, not an ``N x D`` mask: NaN spreads to both, an
    infinity is one of them, and a row is all zero when both are 0.
    """
    if embeddings.shape[1] == 0:
        return torch.zeros(len(embeddings), dtype=torch.bool, device=embeddings.device)
    top, bottom = embeddings.detach().amax(dim=1), embeddings.detach().amin(dim=1)
    return torch.isfinite(top) & torch.isfinite(bottom) & ((top != 0) | (bottom != 0))


def neighbour_labels(labels: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` labels of the ``neighbours`` indices, -1 where an index is -1 (no
    neighbour); ``labels[neighbours]`` would read the last label there."""
    found = labels[neighbours.clamp(min=0)]
    return torch.where(neighbours >= 0, found, -1)


def label_distribution(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, C)`` float32 fraction of each row's neighbours in each class, from the
    ``(N, k)`` labels of its neighbours (the uniform row when ``k`` is 0; a row of NaN
    where the labels are -1, no neighbours)."""
    num_rows, k = neighbour_labels.shape
    device = neighbour_labels.device
    if k == 0:
        return torch.full((num_rows, num_classes), 1.0 / num_classes, device=device)
    missing = neighbour_labels[:, 0] < 0  # a row has all its neighbours or none
    counts = torch.zeros(num_rows, num_classes, dtype=torch.float32, device=device)
    counts.scatter_add_(
        1, neighbour_labels.clamp(min=0), torch.ones(neighbour_labels.shape, device=device)
    )
    counts[missing] = torch.nan
    return counts / k


def label_agreement(
    neighbour_labels: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``(N,)`` float32 :func:`label_distribution` at each row's own label, without the
    ``(N, C)`` array: the fraction of its neighbours that share its label (NaN for a row
    without neighbours)."""
    k = neighbour_labels.shape[1]
    if k == 0:
        return torch.full(labels.shape, 1.0 / num_classes, device=neighbour_labels.device)
    agreement = (neighbour_labels == labels[:, None]).sum(dim=1) / float(k)
    agreement[neighbour_labels[:, 0] < 0] = torch.nan
    return agreement


def _check(
    embeddings: torch.Tensor, labels: torch.Tensor, k: int, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    embeddings, k, chunk_size = _check_embeddings(embeddings, k, chunk_size)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"`labels` must be a torch.Tensor of shape (N,), got {type(labels).__name__}"
        )
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            "`labels` must be a 1-D tensor of integer class indices, got dtype"
            f" {labels.dtype} and shape {tuple(labels.shape)}"
        )
    if len(labels) != len(embeddings):
        raise ValueError(
            f"`labels` has {len(labels)} entries but `embeddings` has {len(embeddings)} rows;"
            " they must describe the same samples"
        )
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(
            f"`labels` must be class indices >= 0, got {int(labels.min())}; drop ignored"
            " samples before computing neighbours"
        )
    return embeddings, labels.detach().to(embeddings.device, torch.long), k, chunk_size


def _check_embeddings(
    embeddings: torch.Tensor, k: int, chunk_size: int | None
) -> tuple[torch.Tensor, int, int]:
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(
            f"`embeddings` must be a torch.Tensor of shape (N, D), got {type(embeddings).__name__}"
        )
    if embeddings.ndim != 2 or not embeddings.dtype.is_floating_point:
        raise ValueError(
            "`embeddings` must be a 2-D floating-point tensor (N samples x D), got dtype"
            f" {embeddings.dtype} and shape {tuple(embeddings.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    if chunk_size is None:
        values = min(_AUTO_CHUNK_VALUES, max(_MIN_CHUNK_VALUES, embeddings.numel()))
        chunk_size = max(1, values // max(len(embeddings), 1))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be None or an integer >= 1, got {chunk_size!r}")
    return embeddings.detach(), k, chunk_size


def _directed_neighbours(
    embeddings: torch.Tensor, k: int, chunk_size: int, exclude_self: bool
) -> torch.Tensor:
    """:func:`_neighbours` among the rows with a direction; -1 rows for the others."""
    return _among_directed(embeddings, lambda rows: _neighbours(rows, k, chunk_size, exclude_self))


def _among_directed(
    embeddings: torch.Tensor, search: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``search`` run on the rows with a direction alone, its indices mapped back to all
    rows; the other rows get -1. Unchanged (no copy) when every row has one."""
    directed = has_direction(embeddings)
    if bool(directed.all()):
        return search(embeddings)
    kept = directed.nonzero().squeeze(1)
    found = search(embeddings[kept])
    kept = kept.to(found.device)
    # at least one column, so a row without neighbours still shows as -1
    out = torch.full(
        (len(embeddings), max(found.shape[1], 1)), -1, dtype=torch.long, device=found.device
    )
    out[kept, : found.shape[1]] = kept[found]
    return out


def _neighbours(
    embeddings: torch.Tensor, k: int, chunk_size: int, exclude_self: bool
) -> torch.Tensor:
    """Valid input assumed. One chunk x N similarity block at a time. ``topk(k + 1)`` finds
    the neighbours; only a row whose k-th and (k+1)-th similarities tie (rare with real
    embeddings) needs a full mask to pick the lowest indices among the tied, so ties never
    depend on the kernel. Float32 embeddings are not copied: the block is divided by the
    norms instead of normalising every row first (an N x D copy)."""
    num_samples = len(embeddings)
    device = embeddings.device
    available = num_samples - 1 if exclude_self else num_samples
    k = min(k, available)
    if k < 1:
        return torch.empty(num_samples, 0, dtype=torch.long, device=device)
    out = torch.empty(num_samples, k, dtype=torch.long, device=device)
    work_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    keys = embeddings.to(work_dtype)  # no copy when already float32
    # normalize()'s rule, x / max(|x|, eps): an all-zero row is similar to nothing
    inverse_norms = 1 / keys.norm(dim=1).clamp(min=1e-12)
    width = min(k + 1, num_samples)  # one more than needed, to see ties at the boundary
    for start in range(0, num_samples, chunk_size):
        rows = keys[start : start + chunk_size] * inverse_norms[start : start + chunk_size, None]
        sim = rows @ keys.T
        sim *= inverse_norms
        if exclude_self:
            own = torch.arange(len(rows), device=device)
            sim[own, own + start] = -torch.inf
        values, neighbours = sim.topk(width, dim=1)
        neighbours = neighbours[:, :k]
        if width > k:
            tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
            if len(tied):
                neighbours[tied] = _lowest_index_neighbours(sim[tied], values[tied, k - 1 :], k)
        del sim
        out[start : start + len(rows)] = neighbours
    return out


def _lowest_index_neighbours(sim: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``sim`` whose k-th largest value ``kth[:, :1]`` ties with others: the
    entries above it plus, among those equal to it, the lowest indices, ``k`` per row."""
    kth = kth[:, :1]
    chosen = sim > kth
    ties = sim == kth
    wanted = k - chosen.sum(dim=1, keepdim=True)
    chosen |= ties & (ties.cumsum(dim=1) <= wanted)
    return chosen.nonzero()[:, 1].reshape(len(sim), k)
