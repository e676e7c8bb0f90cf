"""Watched classes: samples whose embedding leans toward a class their label leaves out.

A clip of a dog bark with a siren behind it, labelled only ``dog_bark``, is a label error
the classifier cannot show: trained on single labels, it learns that a siren under a
bark still means ``dog_bark``, and is confident of it. Its embedding keeps more of the
siren than its softmax does. For a watched class ``w`` and a sample labelled ``g`` that
the model predicts as ``c``, the *watch score* is how far the sample lies along what
sets ``w``'s samples apart from those of ``g`` (and of ``c``), as a robust z-score among
the samples labelled ``g``:

    d = mu_w without its part in the span of mu_g (and mu_c, when c is neither g nor w)
    s_i = <e_i, d>,   score_i = (s_i - median_g(s)) / (1.4826 * MAD_g(s))

with ``e_i`` the L2-normalised embedding and ``mu_k`` the mean normalised embedding of
the samples labelled ``k`` (cosine geometry, as the neighbour search). A drill labelled
air conditioner is explained by the drills; only what it holds of sirens beyond that
counts.

Measured (scratch scripts, not benchmarks): on the urban-sounds detection benchmark's
folds (``benchmarks/detection.py --data urban_sounds``, 3 seeds, 82 clips holding a siren
their label leaves out), a score >= 3 along ``mu_w`` without its part along ``mu_g``
flagged 95 clips per seed, 57 of them predicted as a third class; with that class's part
taken out too, 63 (10 predicted as a third class), and of the 10 highest scores per
validation half 13.0 of 20 were hidden sirens instead of 6.3. Added to the default
candidates it gave 31 flags per seed, 13.0 of them hidden sirens (25 for 12.7 without
the predicted class); the plain difference ``mu_w - mu_g`` added 32 for 13.3, since it
also rewards any sample unlike its label's; ``<e_i, mu_w>`` alone added 12 for 5.0.
Unnormalised embeddings found fewer hidden sirens, a shrunk-covariance (LDA) direction
no more.

The callback also keeps each sample's score from the first validation that scored it
(``first_watch_<class>``) and flags either score >= 3. A model learns the annotators'
habits as it trains (networks fit the clean pattern before the noise): from barks over
sirens labelled ``dog_bark`` it learns to overlook the siren, and such clips lean less
with each epoch (in two of the example's runs, 6 of the 8 such clips that the last
epoch missed scored 3.6-4.9 in the first). Measured on 8 runs of the example (seeds 0-7,
scored against its ground truth), the candidates held 27 of 48 dog barks hiding a siren
instead of 19 with the last epoch's score alone, and 161 of 216 hidden sirens instead of
147, for 928 candidates instead of 865 (661 right instead of 647). On the benchmark's
folds: 54.3 hidden sirens per seed (12.7 of 20 dog barks) instead of 50.0 (11.0), for
499 flags instead of 463. In 8 such runs, the largest score of any epoch found 30 of 48
dog barks against 27, for 609 watch flags against 430; the second epoch's score found no
dog bark that the last epoch's missed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from labelwatch.neighbours import has_direction

__all__ = ["DEFAULT_MIN_WATCH_SCORE", "MIN_CLASS_SAMPLES", "watched_indices", "watch_scores"]

# A sample at least this many robust standard deviations toward a watched class is flagged.
DEFAULT_MIN_WATCH_SCORE = 3.0
# Fewer samples than this with a label give no median and MAD worth the name: NaN.
MIN_CLASS_SAMPLES = 5
_MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
_CHUNK_ROWS = 8192


def watch_scores(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    watched: list[int],
    num_classes: int,
    *,
    predictions: torch.Tensor | None = None,
    chunk_rows: int = _CHUNK_ROWS,
) -> torch.Tensor:
    """Each sample's watch score for each watched class (module docstring).

    Args:
        embeddings: ``(N, D)`` floating-point embeddings, on any device (rows are
            L2-normalised a chunk at a time, so memory stays ``O(chunk_rows x D)`` beyond
            the ``C x D`` class means).
        labels: ``(N,)`` given class indices in ``[0, num_classes)``.
        watched: class indices to watch.
        num_classes: C.
        predictions: ``(N,)`` the model's predicted classes; None leaves out the
            predicted class's part (the direction then depends on the label only).
        chunk_rows: rows normalised and projected at once.

    Returns:
        ``(N, len(watched))`` float32 on the CPU; higher = leans further toward the watched
        class than the other samples with its label. NaN for a sample labelled with the
        watched class itself, when no sample is labelled with the watched class, for a
        label with fewer than ``MIN_CLASS_SAMPLES`` samples or no spread (MAD 0), and for
        an embedding with NaN or infinite values or all zero (:func:`has_direction`),
        which is left out of the class means and the medians too.

    Raises:
        ValueError: for inputs of the wrong shape or range.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError("`embeddings` must be a 2-D tensor (N, D)")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if name == "predictions" and values is None:  # optional
            continue
        if not isinstance(values, torch.Tensor) or values.shape != (len(embeddings),):
            raise ValueError(f"`{name}` must be a tensor of shape ({len(embeddings)},)")
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"`{name}` must lie in [0, {num_classes})")
    bad = [w for w in watched if not 0 <= w < num_classes]
    if bad:
        raise ValueError(f"watched classes {bad} are not in [0, {num_classes})")
    device = embeddings.device
    labels = labels.to(device)
    scores = torch.full((len(labels), len(watched)), float("nan"))
    if not watched or not len(labels):
        return scores
    directed = has_direction(embeddings)
    if not bool(directed.all()):  # score the others as if these rows were not there
        kept = directed.nonzero().squeeze(1)
        scores[kept.cpu()] = watch_scores(
            embeddings[kept],
            labels[kept],
            watched,
            num_classes,
            predictions=predictions[kept.to(predictions.device)]
            if predictions is not None
            else None,
            chunk_rows=chunk_rows,
        )
        return scores

    def normalised(start: int) -> torch.Tensor:
        rows = embeddings[start : start + chunk_rows].float()
        return torch.nn.functional.normalize(rows, dim=1)

    starts = range(0, len(labels), chunk_rows)
    sums = torch.zeros(num_classes, embeddings.shape[1], device=device)
    for start in starts:
        sums.index_add_(0, labels[start : start + chunk_rows], normalised(start))
    counts = torch.bincount(labels, minlength=num_classes)
    means = sums / counts.clamp(min=1)[:, None]
    columns = torch.tensor(watched, device=device)
    gram = means @ means.T  # (C, C) inner products of the class means
    squared_norms = gram.diagonal().clamp(min=1e-12)
    beta = gram[:, columns] / squared_norms[:, None]  # (C, W): mu_w's part along mu_g
    if predictions is not None:
        predictions = predictions.to(device)
    blocks = []
    for start in starts:
        rows, e = labels[start : start + chunk_rows], normalised(start)
        along_label = (e * means[rows]).sum(1)
        # <e_i, mu_w> - beta[g, w] <e_i, mu_g>, one (chunk, W) block at a time
        block = e @ means[columns].T - beta[rows] * along_label[:, None]
        if predictions is not None:
            # less the part along v = mu_c without its part along mu_g (Gram-Schmidt)
            predicted = predictions[start : start + chunk_rows]
            gamma = gram[predicted, rows] / squared_norms[rows]
            along_v = (e * means[predicted]).sum(1) - gamma * along_label
            v_squared = gram[predicted, predicted] - gamma * gram[predicted, rows]
            watched_along_v = (
                gram[predicted[:, None], columns] - gamma[:, None] * gram[rows[:, None], columns]
            )
            third = (predicted != rows)[:, None] & (predicted[:, None] != columns)
            third &= (v_squared > 1e-12)[:, None]
            correction = watched_along_v * (along_v / v_squared.clamp(min=1e-12))[:, None]
            block = block - torch.where(third, correction, torch.zeros_like(correction))
        blocks.append(block)
    projections = torch.cat(blocks).cpu()
    labels, counts = labels.cpu(), counts.cpu()
    order = torch.argsort(labels, stable=True)
    for members in torch.split(order, counts.tolist()):  # the samples of each label
        if len(members) < MIN_CLASS_SAMPLES:
            continue
        values = projections[members]  # (n_g, W)
        median = values.quantile(0.5, dim=0)  # torch's median() takes the lower middle value
        spread = _MAD_TO_STD * (values - median).abs().quantile(0.5, dim=0)
        z = (values - median) / spread
        z[:, spread == 0] = float("nan")
        scores[members] = z
    for column, w in enumerate(watched):
        if counts[w] == 0:
            scores[:, column] = float("nan")
        scores[labels == w, column] = float("nan")
    return scores


def watched_indices(watch_classes: Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Class indices of ``watch_classes``, given by name or by index."""
    indices = []
    for watched in watch_classes:
        if isinstance(watched, str) and watched in class_names:
            indices.append(list(class_names).index(watched))
        elif (
            isinstance(watched, int)
            and not isinstance(watched, bool)
            and 0 <= watched < len(class_names)
        ):
            indices.append(watched)
        else:
            raise ValueError(
                f"`watch_classes` names {watched!r}, which is not a class: give one of the"
                f" class names {list(class_names)} or an index below {len(class_names)}"
            )
    repeated = sorted({class_names[i] for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"`watch_classes` names {repeated} more than once")
    return indices
