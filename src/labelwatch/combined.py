"""Label quality from the epoch history and the embedding neighbourhood: pure torch functions.

cleanlab sees one snapshot of predicted probabilities. labelwatch also sees every
validation epoch and the embeddings, and combines three signals:

- ``probs``: the probabilities averaged over the last ``window`` validation epochs
  (:class:`labelwatch.history.EpochHistory`), a snapshot ensemble;
- ``knn_distribution``: the labels of each sample's ``k`` nearest neighbours in the
  embedding space (:func:`labelwatch.neighbours.knn_label_distribution`);
- the two mixed, ``p_mix = (1 - knn_weight) * probs + knn_weight * knn_distribution``, a
  distribution over classes that both the model and the neighbourhood vote on.

LabelWatch's defaults (``label_quality="knn_mixed_margin"``, ``candidate_rule="combined"``,
``history_window=3``, ``knn_weight=0.3``, ``min_knn_agreement=0.2``; computed by
:func:`history_scores`), chosen by measurement with ``python benchmarks/detection.py`` (digits, a
2-fold cross-validated MLP with 20 validation epochs, window 3, k 10, noise 5/20/40% of
three kinds: uniform, class-conditional, ambiguous mixtures; 3 seeds; mean over the 9
settings; 74 s on 2 cores), checked on ``--data synthetic --seeds 2`` (a 10-class
``make_classification`` task):

==============================================  ==============  ==============
ranking (AP) / flag (F1), mean of 9 settings    digits          synthetic
==============================================  ==============  ==============
cleanlab self_confidence (last epoch)           AP 0.807        AP 0.646
cleanlab normalized_margin (last epoch)         AP 0.841        AP 0.604
cleanlab confidence_weighted_entropy            AP 0.745        AP 0.629
``averaged_self_confidence``                    AP 0.813        AP 0.649
``averaged_margin``                             AP 0.852        AP 0.607
``knn_agreement``                               AP 0.762        AP 0.596
``knn_mixed_self_confidence``                   AP 0.823        AP 0.663
``knn_mixed_margin`` (default)                  AP 0.870        AP 0.648
cleanlab prune_by_noise_rate / prune_by_class   F1 0.746/0.745  F1 0.589/0.610
cleanlab confident_learning (= labelwatch's)    F1 0.715        F1 0.562
confident learning on averaged probs            F1 0.715        F1 0.567
flag streak >= 2 epochs                         F1 0.702        F1 0.565
CL on ``p_mix`` or kNN agreement < 0.2 (dflt)   F1 0.803        F1 0.641
==============================================  ==============  ==============

Against cleanlab's best method *per setting* (an oracle choice), the default ranking
gains +0.027 AP on average on digits (>= +0.03 in 5 of 9 settings; uniform noise is at
AP 0.98-0.99 for every method) but -0.011 on the synthetic task (ahead in 2 of 9:
self-confidence beats margins there); the default flag gains +0.009 F1 on digits (5 of
9; it trails ``predicted_neq_given`` on ambiguous mixtures at 20/40% and
``prune_by_noise_rate`` on class-conditional noise at 5/20%) and +0.022 on synthetic
(8 of 9). Margin vs self-confidence depends on the data; ``knn_mixed_margin`` has the
best AP averaged over both tasks (0.759 vs 0.743 for ``knn_mixed_self_confidence`` and
0.727 for cleanlab's best single method). Sensitivity (digits, an exploratory run of the
same protocol): ``window`` 1/3/5 gave AP 0.866/0.872/0.873, ``k`` 5/10/20 gave
0.868/0.872/0.871, ``knn_weight`` 0.5 instead of 0.3 gave 0.871; the flag's F1 with
``k`` 5/10/20 was 0.788/0.807/0.810. Also tried (same runs, gain over cleanlab's best per
setting, digits / synthetic): ranking by ``p_mix(given)`` -0.021 / +0.004 AP, by the mean of
it and the margin +0.014 / +0.000, the margin with ``knn_weight`` 0.5 +0.026 / +0.000; as
the flag, ``prune_by_noise_rate`` on ``p_mix`` or kNN < 0.2 +0.016 / +0.018 F1 (6 and 7 of
9 settings, against 5 and 8 for the default), ``argmax p_mix != given`` -0.011 / -0.034.
None was better on both tasks, so the defaults stayed. The default ranking's top K rows
(``benchmarks/detection.py`` prints them) give F1 0.808 / 0.632 with K the default flag's
count, and 0.823 / 0.624 with K the true number of errors (an oracle; 8 of 9 settings
met on digits): on digits the misses come from the count more than from the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from labelwatch.scoring import compute_scores, confident_thresholds, describe

__all__ = [
    "COMBINED_METHODS",
    "CombinedMethod",
    "HistoryScores",
    "candidate_flags",
    "combined_quality",
    "history_scores",
    "limit_candidates",
    "mix_probabilities",
    "mixed_thresholds",
    "reachable_agreement",
]

CombinedMethod = Literal[
    "knn_mixed_margin",
    "knn_mixed_self_confidence",
    "averaged_margin",
    "averaged_self_confidence",
    "knn_agreement",
]
COMBINED_METHODS: tuple[str, ...] = (
    "knn_mixed_margin",
    "knn_mixed_self_confidence",
    "averaged_margin",
    "averaged_self_confidence",
    "knn_agreement",
)
DEFAULT_KNN_WEIGHT = 0.3
DEFAULT_MIN_KNN_AGREEMENT = 0.2
# What a kNN method falls back to when there are no neighbours (no embeddings).
WITHOUT_NEIGHBOURS = {
    "knn_mixed_margin": "averaged_margin",
    "knn_mixed_self_confidence": "averaged_self_confidence",
    "knn_agreement": "averaged_margin",
}


@dataclass
class HistoryScores:
    """What LabelWatch adds to each row from the epoch history and the neighbours.

    Attributes:
        quality: ``(N,)`` the combined ``label_quality`` in [0, 1] (lower = more likely
            mislabelled), or None when no combined method was asked for.
        method: the method behind ``quality`` (a ``knn_*`` method's stand-in without
            neighbours, see ``WITHOUT_NEIGHBOURS``), or None.
        averaged_self_confidence: ``(N,)`` the averaged probability of the given label.
        is_mixed_confident_mismatch: ``(N,)`` confident learning on ``p_mix``.
        is_candidate: ``(N,)`` the default candidate rule (see :func:`candidate_flags`).
        suggested: ``(N,)`` class guess for the candidates: confident learning's guess on
            ``p_mix`` where it flags, else the most probable other class in ``p_mix``.
    """

    quality: torch.Tensor | None
    method: str | None
    averaged_self_confidence: torch.Tensor
    is_mixed_confident_mismatch: torch.Tensor
    is_candidate: torch.Tensor
    suggested: torch.Tensor

    @classmethod
    def concat(cls, parts: list[HistoryScores]) -> HistoryScores:
        """The scores of consecutive chunks of rows, as one (every part has the method)."""

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts])

        return cls(
            quality=cat("quality") if parts[0].quality is not None else None,
            method=parts[0].method,
            averaged_self_confidence=cat("averaged_self_confidence"),
            is_mixed_confident_mismatch=cat("is_mixed_confident_mismatch"),
            is_candidate=cat("is_candidate"),
            suggested=cat("suggested"),
        )


def history_scores(
    averaged: torch.Tensor,
    labels: torch.Tensor,
    knn_distribution: torch.Tensor | None = None,
    *,
    method: CombinedMethod | None = "knn_mixed_margin",
    knn_weight: float = DEFAULT_KNN_WEIGHT,
    min_knn_agreement: float | torch.Tensor = DEFAULT_MIN_KNN_AGREEMENT,
    writable: bool = False,
    thresholds: torch.Tensor | None = None,
) -> HistoryScores:
    """Every score LabelWatch derives from the window-averaged probabilities and neighbours.

    The one place the callback's defaults are computed, so ``benchmarks/detection.py``
    measures exactly what LabelWatch logs. Without ``knn_distribution`` (no embeddings)
    ``p_mix`` is ``averaged`` and a ``knn_*`` ``method`` uses its stand-in; so for each
    row of NaN in it (a sample without neighbours), whose kNN clause is then off.

    Args:
        averaged: ``(N, C)`` probabilities averaged over the last epochs.
        labels: ``(N,)`` given class indices in ``[0, C)``.
        knn_distribution: ``(N, C)`` neighbours' label fractions (a row of NaN: none),
            or None.
        method: a combined ``label_quality`` method, or None to skip ``quality``.
        knn_weight: weight of the neighbours in ``p_mix``, in [0, 1].
        min_knn_agreement: see :func:`candidate_flags`.
        writable: ``averaged`` may be changed during the call (it is restored), which saves
            copies; for a tensor nobody else reads meanwhile.
        thresholds: when these rows are a chunk of the samples, confident learning's
            thresholds of ``p_mix`` over all of them (:func:`mixed_thresholds`); the scores
            of consecutive chunks then equal those of one call on every row. None computes
            them from these rows.
    """
    if method is not None and method not in COMBINED_METHODS:
        raise ValueError(f"`method` must be None or one of {COMBINED_METHODS}, got {method!r}")
    _check_probs_labels(averaged, labels)
    _check_weight(knn_weight)
    _check_min_agreement(min_knn_agreement, len(labels))
    labels = labels.to(averaged.device, torch.long)
    if knn_distribution is None:
        mixed = averaged.float()
        if method is not None:
            method = WITHOUT_NEIGHBOURS.get(method, method)
    else:
        mixed = mix_probabilities(averaged, knn_distribution, knn_weight=knn_weight)
    private = writable or mixed is not averaged  # a new tensor can be written to
    scored = compute_scores(
        mixed, labels, with_entropy=False, writable=private, thresholds=thresholds
    )
    candidate = scored.is_confident_mismatch
    if knn_distribution is not None:
        candidate = candidate | _neighbours_disagree(knn_distribution, labels, min_knn_agreement)
    quality = None
    if method is not None and (method.startswith("knn_mixed") or knn_distribution is None):
        # `mixed` is what the method ranks on: its scores are already in `scored`, computed
        # with the same float operations as combined_quality's.
        if method.endswith("margin"):
            quality = ((scored.margin + 1) / 2).clamp(0.0, 1.0)
        else:
            quality = scored.self_confidence.clamp(0.0, 1.0)
    elif method is not None:
        quality = combined_quality(
            averaged, labels, knn_distribution, method=method, knn_weight=knn_weight
        )
        alone = _without_neighbours(knn_distribution)
        if method == "knn_agreement" and alone.any():  # their stand-in: the averaged margin
            quality[alone] = ((scored.margin[alone] + 1) / 2).clamp(0.0, 1.0)
    return HistoryScores(
        quality=quality,
        method=method,
        averaged_self_confidence=averaged.float().gather(1, labels[:, None]).squeeze(1),
        is_mixed_confident_mismatch=scored.is_confident_mismatch,
        is_candidate=candidate,
        suggested=torch.where(scored.is_confident_mismatch, scored.suggested, scored.best_other),
    )


def mixed_thresholds(
    averaged_given: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    knn_agreement: torch.Tensor | None = None,
    *,
    knn_weight: float = DEFAULT_KNN_WEIGHT,
) -> torch.Tensor:
    """Confident learning's per-class thresholds of ``p_mix``, from the given-label column
    alone: ``averaged_given`` ``(N,)`` the averaged probability of each given label and
    ``knn_agreement`` ``(N,)`` its neighbours' fraction (None or NaN: no neighbours). Lets
    :func:`history_scores` work through chunks of rows without an ``(N, C)`` ``p_mix``."""
    given = averaged_given.float()[:, None]
    if knn_agreement is not None:  # p_mix at the given label, with the same float operations
        given = mix_probabilities(given, knn_agreement[:, None], knn_weight=knn_weight)
    else:
        _check_weight(knn_weight)
    return confident_thresholds(given.squeeze(1), labels, num_classes)


def mix_probabilities(
    probs: torch.Tensor, knn_distribution: torch.Tensor, *, knn_weight: float = DEFAULT_KNN_WEIGHT
) -> torch.Tensor:
    """``(1 - knn_weight) * probs + knn_weight * knn_distribution``, rows summing to 1.

    Args:
        probs: ``(N, C)`` probabilities (e.g. averaged over epochs), rows summing to 1.
        knn_distribution: ``(N, C)`` fraction of each sample's neighbours in each class;
            a row of NaN for a sample without neighbours.
        knn_weight: in [0, 1]; 0 gives ``probs``, 1 the neighbours' labels alone.

    Returns:
        ``(N, C)`` float32 on ``probs``' device; ``probs``' row for a sample without
        neighbours.
    """
    _check_pair(probs, knn_distribution)
    _check_weight(knn_weight)
    knn = knn_distribution.to(probs.device, torch.float32)
    mixed = (1 - knn_weight) * probs.float() + knn_weight * knn
    alone = _without_neighbours(knn)
    if alone.any():
        mixed[alone] = probs[alone].float()
    return mixed


def combined_quality(
    probs: torch.Tensor,
    labels: torch.Tensor,
    knn_distribution: torch.Tensor | None = None,
    *,
    method: CombinedMethod = "knn_mixed_margin",
    knn_weight: float = DEFAULT_KNN_WEIGHT,
) -> torch.Tensor:
    """Label quality in [0, 1]; lower = more likely mislabelled.

    Args:
        probs: ``(N, C)`` probabilities, ideally averaged over the last epochs.
        labels: ``(N,)`` given class indices in ``[0, C)``.
        knn_distribution: ``(N, C)`` neighbours' label fractions; required by the
            ``knn_*`` methods, ignored by the others. A row of NaN (no neighbours) has
            ``p_mix`` = ``probs``; its ``"knn_agreement"`` is NaN.
        method: ``"knn_mixed_margin"`` (default): ``(p_mix(given) - max p_mix(other) + 1)
            / 2``; ``"knn_mixed_self_confidence"``: ``p_mix(given)``;
            ``"averaged_margin"`` / ``"averaged_self_confidence"``: the same on ``probs``
            alone (no embeddings needed); ``"knn_agreement"``: the neighbours alone. The
            numbers behind the default are in the module docstring.
        knn_weight: weight of the neighbours in ``p_mix``, in [0, 1].

    Returns:
        ``(N,)`` float32 tensor on ``probs``' device, in [0, 1].

    Raises:
        ValueError: for an unknown ``method``, a missing ``knn_distribution``, shapes
            that disagree, labels outside ``[0, C)`` or ``knn_weight`` outside [0, 1].
    """
    if method not in COMBINED_METHODS:
        raise ValueError(f"`method` must be one of {COMBINED_METHODS}, got {method!r}")
    _check_probs_labels(probs, labels)
    labels = labels.to(probs.device, torch.long)
    if method.startswith("knn"):
        if knn_distribution is None:
            raise ValueError(
                f"`method`={method!r} needs `knn_distribution` (from"
                " labelwatch.neighbours.knn_label_distribution); pass it, or use"
                " 'averaged_margin' when there are no embeddings"
            )
        _check_pair(probs, knn_distribution)
    _check_weight(knn_weight)
    if method == "knn_agreement":
        values = knn_distribution.to(probs.device, torch.float32)
    elif method.startswith("knn_mixed"):
        values = mix_probabilities(probs, knn_distribution, knn_weight=knn_weight)
    else:
        values = probs.float()
    given = values.gather(1, labels[:, None]).squeeze(1)
    if method.endswith("self_confidence") or method == "knn_agreement":
        return given.clamp(0.0, 1.0)
    others = values.scatter(1, labels[:, None], -torch.inf)
    return ((given - others.max(dim=1).values + 1) / 2).clamp(0.0, 1.0)


def candidate_flags(
    probs: torch.Tensor,
    labels: torch.Tensor,
    knn_distribution: torch.Tensor | None = None,
    *,
    knn_weight: float = DEFAULT_KNN_WEIGHT,
    min_knn_agreement: float | torch.Tensor = DEFAULT_MIN_KNN_AGREEMENT,
) -> torch.Tensor:
    """The default candidate rule: confident mismatch on ``p_mix``, or few agreeing neighbours.

    A sample is flagged when confident learning (cleanlab's ``confident_learning`` filter,
    per-class thresholds) finds another class confident in ``p_mix``, the probabilities
    mixed with the neighbours' labels, **or** when fewer than ``min_knn_agreement`` of its
    neighbours share its label (with ``k=10`` and 0.2: at most one neighbour agrees).
    Without ``knn_distribution`` it is confident learning on ``probs`` alone, and so for
    a row of NaN in it (a sample without neighbours).

    Args:
        probs: ``(N, C)`` probabilities, ideally averaged over the last epochs.
        labels: ``(N,)`` given class indices in ``[0, C)``.
        knn_distribution: ``(N, C)`` neighbours' label fractions, or None.
        knn_weight: weight of the neighbours in ``p_mix``, in [0, 1].
        min_knn_agreement: in [0, 1]; 0 turns the neighbourhood clause off. A ``(N,)``
            tensor gives each sample its own; LabelWatch passes ``min_knn_agreement *``
            :func:`reachable_agreement`, so a class too small to fill a neighbourhood is
            not flagged for being small.

    Returns:
        ``(N,)`` bool tensor on ``probs``' device; True = relabel candidate.
    """
    _check_probs_labels(probs, labels)
    _check_weight(knn_weight)
    _check_min_agreement(min_knn_agreement, len(labels))
    labels = labels.to(probs.device, torch.long)
    if knn_distribution is None:
        return compute_scores(probs.float(), labels).is_confident_mismatch
    mixed = mix_probabilities(probs, knn_distribution, knn_weight=knn_weight)
    flags = compute_scores(mixed, labels).is_confident_mismatch
    return flags | _neighbours_disagree(knn_distribution, labels, min_knn_agreement)


def reachable_agreement(labels: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """``(N,)`` float32: the largest kNN agreement each sample's class allows, in [0, 1].

    A class of ``n`` samples can put at most ``n - 1`` of them among a sample's
    ``num_neighbours`` neighbours: with 10 neighbours, a class of 2 reaches at most 0.1
    however right its labels are. Scaling the minimum agreement by this keeps the
    neighbourhood clause from flagging every sample of a rare class (and a lone sample,
    which has no neighbours, is never flagged by it).
    """
    counts = torch.bincount(labels.long(), minlength=1)[labels.long()]
    if num_neighbours < 1:
        return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    return ((counts - 1).float() / num_neighbours).clamp(0.0, 1.0)


def _without_neighbours(knn_distribution: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the rows of NaN, samples without neighbours."""
    return knn_distribution.isnan().any(dim=1)


def _neighbours_disagree(
    knn_distribution: torch.Tensor, labels: torch.Tensor, min_knn_agreement: float | torch.Tensor
) -> torch.Tensor:
    """The candidate rule's neighbourhood clause: kNN agreement below the minimum (never
    for a sample without neighbours: NaN is below nothing)."""
    agreement = knn_distribution.to(labels.device, torch.float32).gather(1, labels[:, None])
    if isinstance(min_knn_agreement, torch.Tensor):
        min_knn_agreement = min_knn_agreement.to(labels.device, torch.float32)
    return agreement.squeeze(1) < min_knn_agreement


def _check_min_agreement(min_knn_agreement: float | torch.Tensor, num_samples: int) -> None:
    values = min_knn_agreement
    if isinstance(values, torch.Tensor) and values.ndim > 0:
        values = values.float()
        if values.shape != (num_samples,) or (
            num_samples and not (values.min() >= 0 and values.max() <= 1)
        ):
            raise ValueError(
                "`min_knn_agreement` must be a number in [0, 1] or one per sample, a tensor of"
                f" shape ({num_samples},) with values in [0, 1]; got shape {tuple(values.shape)}"
            )
        return
    if not 0.0 <= float(min_knn_agreement) <= 1.0:
        raise ValueError(f"`min_knn_agreement` must be in [0, 1], got {min_knn_agreement!r}")


def limit_candidates(
    flags: torch.Tensor, quality: torch.Tensor, max_candidates: int | None
) -> torch.Tensor:
    """Keep at most ``max_candidates`` flags: those with the lowest ``quality`` (ties: lower
    index first). None keeps every flag. Returns a new ``(N,)`` bool tensor."""
    if max_candidates is None:
        return flags.clone()
    if (
        isinstance(max_candidates, bool)
        or not isinstance(max_candidates, int)
        or max_candidates < 0
    ):
        raise ValueError(
            f"`max_candidates` must be None or an integer >= 0, got {max_candidates!r}"
        )
    if flags.shape != quality.shape or flags.ndim != 1:
        raise ValueError(
            f"`flags` and `quality` must both have shape (N,), got {tuple(flags.shape)} and"
            f" {tuple(quality.shape)}"
        )
    flagged = flags.nonzero().squeeze(1)
    if len(flagged) <= max_candidates:
        return flags.clone()
    order = torch.sort(quality[flagged], stable=True).indices[:max_candidates]
    out = torch.zeros_like(flags)
    out[flagged[order]] = True
    return out


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(
            f"`probs` must be a 2-D tensor with at least 2 classes, got {describe(probs)}"
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.shape != (len(probs),)
        or labels.dtype.is_floating_point
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"`labels` must be an integer tensor of shape ({len(probs)},), got {describe(labels)}"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(
            f"`labels` must be class indices in [0, {probs.shape[1]}), got values in"
            f" [{int(labels.min())}, {int(labels.max())}]"
        )


def _check_pair(probs: torch.Tensor, knn_distribution: torch.Tensor) -> None:
    if not isinstance(knn_distribution, torch.Tensor) or knn_distribution.shape != probs.shape:
        raise ValueError(
            f"`knn_distribution` must have the shape of `probs`, {tuple(probs.shape)}, got"
            f" {describe(knn_distribution)}"
        )


def _check_weight(knn_weight: float) -> None:
    if not 0.0 <= knn_weight <= 1.0:
        raise ValueError(f"`knn_weight` must be in [0, 1], got {knn_weight!r}")
