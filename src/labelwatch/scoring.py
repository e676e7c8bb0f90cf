"""Per-sample label scores from a classifier's predictions: pure torch functions.

Every score documents its range and direction. The confident-mismatch flag follows
confident learning (Northcutt et al., 2021) exactly as cleanlab's
``find_label_issues(labels, pred_probs, filter_by="confident_learning")`` computes it,
so the two select the same samples, ties included.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

__all__ = [
    "LABEL_QUALITY_METHODS",
    "SAMPLE_COLUMNS",
    "LabelQualityMethod",
    "check_predictions",
    "score_predictions",
]

LabelQualityMethod = Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"]
LABEL_QUALITY_METHODS: tuple[str, ...] = (
    "self_confidence",
    "normalized_margin",
    "confidence_weighted_entropy",
)

# The per-sample table of DESIGN.md, in order; later work may add columns after these.
SAMPLE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "epoch",
    "given_label",
    "given_name",
    "predicted_label",
    "predicted_name",
    "confidence",
    "self_confidence",
    "margin",
    "entropy",
    "is_mismatch",
    "is_confident_mismatch",
    "label_quality",
    "suggested_label",
    "suggested_name",
    "x",
    "y",
)

# cleanlab's constants, kept identical so the flags agree to the last tie.
_FLOAT_TOLERANCE = 1e-6
_THRESHOLD_LOWER_BOUND = 2e-6
_MISSING_CLASS_THRESHOLD = 2.0  # no probability reaches it: absent classes are never confident
_CLIP = 1e-6
# Values per chunk of the N x C work (16 MB of float32): peak memory stays the input plus
# a few chunks, and chunks stay large enough for vectorised kernels.
_CHUNK_VALUES = 1 << 22


@dataclass
class Scores:
    """Per-sample scores as tensors (length N), plus the per-class thresholds (length C)."""

    predicted: torch.Tensor
    confidence: torch.Tensor
    self_confidence: torch.Tensor
    margin: torch.Tensor
    best_other: torch.Tensor  # the most probable class other than the given one
    entropy: torch.Tensor | None  # None when not asked for
    is_confident_mismatch: torch.Tensor
    suggested: torch.Tensor
    label_quality: torch.Tensor
    thresholds: torch.Tensor


def check_predictions(
    values: Any,
    labels: Any,
    *,
    name: str = "logits",
    class_names: Sequence[str] | None = None,
    sample_ids: Sequence[Any] | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Any], torch.Tensor]:
    """The input checks of :func:`score_predictions`, without scoring: the callback runs
    them on Lightning's sanity-check batches, so mistakes show before training.

    Returns ``(values, labels, class names, sample ids, ignored)``: ``values`` as a
    tensor, ``labels`` as int64 on its device, and which labels are ``ignore_index``.

    Raises:
        ValueError: as :func:`score_predictions`.
    """
    values = _as_tensor(values, name)
    if values.ndim != 2:
        fix = (
            " A binary classifier with one logit z a sample: pass"
            " `torch.stack([torch.zeros_like(z), z], 1)` (its softmax is [1 - sigmoid(z),"
            " sigmoid(z)])."
            if name == "logits" and values.ndim == 1
            else " Flatten extra dimensions or pick the classification head's output."
        )
        raise ValueError(
            f"`{name}` must be 2-D (N samples x C classes), got shape {tuple(values.shape)}.{fix}"
        )
    num_samples, num_classes = values.shape
    if num_classes < 2:
        fix = (
            " A binary classifier with one logit z: pass `torch.cat([torch.zeros_like(z), z], 1)`"
            " (its softmax is [1 - sigmoid(z), sigmoid(z)])."
            if name == "logits" and num_classes == 1
            else ""
        )
        raise ValueError(
            f"`{name}` must have at least 2 classes (columns), got {num_classes}.{fix}"
        )
    if name == "probs":
        _check_probabilities(values)
    labels_t = _as_tensor(labels, "labels")
    if labels_t.ndim != 1 or labels_t.dtype.is_floating_point or labels_t.dtype == torch.bool:
        raise ValueError(
            "`labels` must be a 1-D tensor of integer class indices, got "
            f"dtype {labels_t.dtype} and shape {tuple(labels_t.shape)}."
        )
    if len(labels_t) != num_samples:
        raise ValueError(
            f"`{name}` has {num_samples} rows but `labels` has {len(labels_t)}: "
            "they must describe the same samples."
        )
    names = _class_names(class_names, num_classes)
    ids = _sample_ids(sample_ids, num_samples)
    labels_t = labels_t.to(values.device, torch.long)

    ignored = labels_t == ignore_index
    out_of_range = ~ignored & ((labels_t < 0) | (labels_t >= num_classes))
    if out_of_range.any():
        bad = labels_t[out_of_range].unique()[:10].tolist()
        raise ValueError(
            f"`labels` must be class indices in [0, {num_classes}) or `ignore_index`="
            f"{ignore_index}; found {bad}. Check the label encoding or the number of classes."
        )
    return values, labels_t, names, ids, ignored


def score_predictions(
    *,
    logits: Any = None,
    probs: Any = None,
    labels: Any,
    class_names: Sequence[str] | None = None,
    sample_ids: Sequence[Any] | None = None,
    epoch: int = 0,
    label_quality: LabelQualityMethod = "self_confidence",
    ignore_index: int = -100,
) -> pd.DataFrame:
    """Score every sample's given label against the model's predictions.

    Args:
        logits: ``(N, C)`` raw scores (torch tensor or array); softmax is applied in float32.
        probs: ``(N, C)`` probabilities instead of logits (rows sum to 1); kept in their dtype.
        labels: ``(N,)`` given class indices in ``[0, C)``; ``ignore_index`` rows are skipped.
        class_names: ``C`` names; defaults to the class indices as strings.
        sample_ids: ``N`` unique ids (ints or strings); defaults to ``0..N-1``.
        epoch: value of the ``epoch`` column.
        label_quality: ranking behind ``label_quality``, in [0, 1], lower = more likely
            mislabelled. ``"self_confidence"`` (default), ``p(given)``;
            ``"normalized_margin"``, ``(p(given) - max p(other) + 1) / 2``;
            ``"confidence_weighted_entropy"``, cleanlab's ``log(1 + r) / r`` with
            ``r = entropy / p(given)``. The default was chosen with
            ``python benchmarks/label_quality.py`` (cross-validated logistic-regression
            probabilities on scikit-learn's digits, labels flipped at 5/20/40%, 3 seeds);
            mean AUROC / average precision: self_confidence 0.986 / 0.899,
            normalized_margin 0.984 / 0.884, confidence_weighted_entropy 0.983 / 0.901.
            These are single-epoch scores; the callback's default ranking also uses the
            epoch history and the embeddings (:mod:`labelwatch.combined`).
        ignore_index: label value that marks unlabelled samples.

    Returns:
        One row per scored sample with the columns of :data:`SAMPLE_COLUMNS`
        (``x`` and ``y`` are NaN: the map is added by the callback). ``df.attrs`` holds
        ``thresholds`` (per class), ``num_ignored``, ``num_nonfinite`` and
        ``class_names`` (the sequences as tuples).

    Raises:
        ValueError: when shapes, lengths, labels, class names or ids are inconsistent.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of `logits` or `probs` to `score_predictions`.")
    if label_quality not in LABEL_QUALITY_METHODS:
        raise ValueError(
            f"`label_quality` must be one of {LABEL_QUALITY_METHODS}, got {label_quality!r}"
        )
    name = "logits" if logits is not None else "probs"
    checked = check_predictions(
        logits if logits is not None else probs,
        labels,
        name=name,
        class_names=class_names,
        sample_ids=sample_ids,
        ignore_index=ignore_index,
    )
    values, labels_t, names, ids, ignored = checked
    num_samples = len(values)
    finite = _finite_rows(values)
    nonfinite = ~finite & ~ignored
    num_nonfinite = int(nonfinite.sum())
    if num_nonfinite:
        warnings.warn(
            f"{num_nonfinite} of {num_samples} samples have NaN or infinite {name} (in float32,"
            " which scoring uses); they are left out of scoring.",
            RuntimeWarning,
            stacklevel=2,
        )
    keep = finite & ~ignored
    kept = values if bool(keep.all()) else values[keep]  # no N x C copy in the usual case
    if logits is None and not kept.dtype.is_floating_point:
        kept = kept.double()
    scores = compute_scores(
        kept, labels_t[keep], from_logits=logits is not None, label_quality=label_quality
    )

    keep_np = keep.cpu().numpy()
    given = labels_t[keep].cpu().numpy()
    predicted = scores.predicted.cpu().numpy()
    suggested = scores.suggested.cpu().numpy()
    names_arr = np.asarray(names, dtype=object)
    frame = pd.DataFrame(
        {
            "sample_id": [ids[i] for i in np.flatnonzero(keep_np)],
            "epoch": np.full(len(given), epoch, dtype=np.int64),
            "given_label": given.astype(np.int64),
            "given_name": names_arr[given],
            "predicted_label": predicted.astype(np.int64),
            "predicted_name": names_arr[predicted],
            "confidence": _np(scores.confidence),
            "self_confidence": _np(scores.self_confidence),
            "margin": _np(scores.margin),
            "entropy": _np(scores.entropy),
            "is_mismatch": predicted != given,
            "is_confident_mismatch": scores.is_confident_mismatch.cpu().numpy(),
            "label_quality": _np(scores.label_quality),
            "suggested_label": suggested.astype(np.int64),
            "suggested_name": names_arr[suggested],
            "x": np.full(len(given), np.nan),
            "y": np.full(len(given), np.nan),
        }
    )
    frame.attrs.update(
        thresholds=_Shared(scores.thresholds.cpu().double().tolist()),
        num_ignored=int(ignored.sum()),
        num_nonfinite=num_nonfinite,
        class_names=_Shared(names),
    )
    return frame


class _Shared(tuple):
    """A tuple that ``copy.deepcopy`` returns as it is. pandas deep-copies ``attrs`` after
    every operation on a frame: for 1000 class names and thresholds that was 0.5 s an epoch."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


def compute_scores(
    values: torch.Tensor,
    labels: torch.Tensor,
    *,
    from_logits: bool = False,
    label_quality: str = "self_confidence",
    with_entropy: bool = True,
    writable: bool = False,
    thresholds: torch.Tensor | None = None,
) -> Scores:
    """Scores for valid input: ``values`` (N, C) finite logits, or probabilities whose rows
    sum to 1; ``labels`` in [0, C). ``with_entropy=False`` skips the entropy (an N x C pass
    over probabilities), which ``label_quality="confidence_weighted_entropy"`` needs.
    ``writable=True`` lets probabilities be changed while scoring (they are restored), which
    saves a copy of every chunk; leave it False for tensors others may read meanwhile.
    ``thresholds``: confident learning's per-class thresholds when these rows are a chunk
    of a larger set (computed over all of it); None computes them from these rows.

    Works through row chunks, softmaxing logits chunk by chunk, so no N x C temporary is
    ever made: peak memory is the input plus a few chunks.
    """
    if not with_entropy and label_quality == "confidence_weighted_entropy":
        raise ValueError("label_quality='confidence_weighted_entropy' needs with_entropy=True")
    num_samples, num_classes = values.shape
    chunk_rows = max(256, _CHUNK_VALUES // num_classes)

    def probabilities(start: int) -> torch.Tensor:
        chunk = values[start : start + chunk_rows]
        if from_logits:
            return torch.softmax(chunk.float(), dim=1)
        return chunk.float() if chunk.dtype == torch.bfloat16 else chunk  # numpy has none

    def logits(start: int) -> torch.Tensor | None:
        return values[start : start + chunk_rows].float() if from_logits else None

    # Results are allocated once and filled chunk by chunk: small tensors kept between the
    # large chunk temporaries would fragment the heap and pin those temporaries' pages.
    device = values.device
    prob_dtype = torch.float32 if from_logits or values.dtype == torch.bfloat16 else values.dtype
    self_conf = torch.empty(num_samples, dtype=prob_dtype, device=device)
    if thresholds is None:
        for start in range(0, num_samples, chunk_rows):
            rows = slice(start, start + chunk_rows)
            self_conf[rows] = probabilities(start).gather(1, labels[rows, None]).squeeze(1)
        thresholds = confident_thresholds(self_conf, labels, num_classes)
    out = {
        "self_confidence": self_conf,
        "predicted": torch.empty(num_samples, dtype=torch.long, device=device),
        "confidence": torch.empty(num_samples, dtype=prob_dtype, device=device),
        "max_other": torch.empty(num_samples, dtype=prob_dtype, device=device),
        "best_other": torch.empty(num_samples, dtype=torch.long, device=device),
        "flag": torch.empty(num_samples, dtype=torch.bool, device=device),
        "suggested": torch.empty(num_samples, dtype=torch.long, device=device),
    }
    # confidence_weighted_entropy divides the entropy by p(given), so a confident mismatch's
    # tiny entropy decides its score; float32 loses it (to 0 when p(given) < 1e-6).
    exact_entropy = from_logits and label_quality == "confidence_weighted_entropy"
    if with_entropy:
        entropy_dtype = torch.float64 if exact_entropy else prob_dtype
        out["entropy"] = torch.empty(num_samples, dtype=entropy_dtype, device=device)
    for start in range(0, num_samples, chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk = _score_chunk(
            probabilities(start),
            labels[rows],
            thresholds,
            logits(start),
            with_entropy,
            writable,
            exact_entropy,
        )
        for key, value in chunk.items():
            out[key][rows] = value
        del chunk
    margin = self_conf - out["max_other"]
    entropy = out.get("entropy")
    quality = _label_quality(label_quality, self_conf, margin, entropy).to(prob_dtype)
    return Scores(
        predicted=out["predicted"],
        confidence=out["confidence"],
        self_confidence=self_conf,
        margin=margin,
        best_other=out["best_other"],
        entropy=None if entropy is None else entropy.to(prob_dtype),
        is_confident_mismatch=out["flag"],
        suggested=out["suggested"],
        label_quality=quality,
        thresholds=thresholds,
    )


def confident_thresholds(
    self_confidence: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-class threshold t_j: the mean p_j over the samples labelled j.

    Computed as numpy's pairwise mean over each class's samples in their original order, so
    the values equal cleanlab's bit for bit; the work is one N-vector, sorted once.
    """
    values = self_confidence.detach().cpu().numpy()
    given = labels.detach().cpu().numpy()
    order = np.argsort(given, kind="stable")
    bounds = np.searchsorted(given[order], np.arange(num_classes + 1))
    sorted_values = values[order]
    out = np.full(num_classes, _MISSING_CLASS_THRESHOLD, dtype=values.dtype)
    for k in range(num_classes):
        if bounds[k + 1] > bounds[k]:
            out[k] = np.mean(sorted_values[bounds[k] : bounds[k + 1]])
    out = np.clip(out, _THRESHOLD_LOWER_BOUND, None)
    return torch.from_numpy(out).to(self_confidence.device)


def _score_chunk(
    probs: torch.Tensor,
    given: torch.Tensor,
    thresholds: torch.Tensor,
    logits: torch.Tensor | None = None,
    with_entropy: bool = True,
    writable: bool = False,
    exact_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Scores of one chunk of rows. ``probs`` is changed in place and restored (saving a
    copy of the chunk) when it is a private softmax of ``logits``, or ``writable``.
    ``exact_entropy`` computes the entropy from logits in float64."""
    rows = torch.arange(len(given), device=probs.device)
    confidence, predicted = probs.max(dim=1)  # first index among ties, like numpy
    given_prob = probs[rows, given]
    others = probs if (logits is not None or writable) else probs.clone()
    others[rows, given] = -math.inf
    max_other, first_other = others.max(dim=1)
    others[rows, given] = given_prob  # restore (a no-op on a copy)
    # Confident learning: class j is confident when p_j >= t_j - 1e-6 (cleanlab's rule;
    # with IEEE floats, p - a >= 0 exactly when p >= a). cleanlab's guess of the true
    # class is the argmax when 2+ classes are confident, else the only confident class,
    # which is the argmax of p - t: one max over the chunk instead of a count.
    excess = probs - (thresholds - _FLOAT_TOLERANCE)
    top_excess, top_class = excess.max(dim=1)
    any_confident = top_excess >= 0
    guess = predicted.clone()
    # Only where the argmax itself is not confident can the guess differ from it.
    unsure = any_confident & (top_class != predicted) & (excess[rows, predicted] < 0)
    unsure = unsure.nonzero().squeeze(1)
    if len(unsure):
        lone = (excess[unsure] >= 0).sum(dim=1) == 1
        guess[unsure] = torch.where(lone, top_class[unsure], predicted[unsure])
    del excess
    # cleanlab then keeps an issue only if argmax(p with p_given + 1e-6) != given, that is
    # another class beats the raised given probability, or ties it at a lower index.
    raised = given_prob + _FLOAT_TOLERANCE
    beaten = (max_other > raised) | ((max_other == raised) & (first_other < given))
    flag = any_confident & (guess != given) & beaten
    suggested = torch.where(flag, guess, predicted)
    out = {
        "self_confidence": given_prob,
        "predicted": predicted,
        "confidence": confidence,
        "max_other": max_other,
        "best_other": first_other,
        "flag": flag,
        "suggested": suggested,
    }
    if with_entropy:
        entropy = _entropy(probs, logits, confidence, predicted, exact_entropy)
        out["entropy"] = (entropy / math.log(probs.shape[1])).clamp(0.0, 1.0)
    return out


def _entropy(
    probs: torch.Tensor,
    logits: torch.Tensor | None,
    top_p: torch.Tensor,
    top: torch.Tensor,
    exact: bool = False,
) -> torch.Tensor:
    """-sum p log p. From logits, log p = x - lse: H = lse - p.x, with lse = x_k - log p_k
    at the argmax k (p_k >= 1/C, so its log is safe); no N x C logarithm is needed. That
    difference cancels to float32's rounding error for a confident row; ``exact`` pays
    for an N x C float64 log-softmax instead, which keeps entropies down to 1e-300."""
    if logits is None:
        return torch.special.entr(probs).sum(dim=1)
    if exact:
        log_p = torch.log_softmax(logits.double(), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)
    top_x = logits.gather(1, top[:, None]).squeeze(1)
    expected_x = torch.bmm(probs[:, None, :], logits[:, :, None]).reshape(-1)
    return (top_x.double() - top_p.double().log() - expected_x.double()).float().clamp(min=0)


def _finite_rows(values: torch.Tensor) -> torch.Tensor:
    """Rows without NaN or inf. A row sum is non-finite whenever the row is; only those
    rows (and sums that overflowed) get the exact check, so the N x C pass is one sum."""
    if not values.dtype.is_floating_point:
        return torch.ones(len(values), dtype=torch.bool, device=values.device)
    finite = torch.isfinite(values.sum(dim=1))  # an overflowing sum is only a suspect
    suspects = (~finite).nonzero().squeeze(1)
    if len(suspects):
        finite[suspects] = torch.isfinite(values[suspects]).all(dim=1)
    if values.dtype == torch.float64:  # scored in float32, where these are infinite
        largest = torch.finfo(torch.float32).max
        finite &= (values.amax(dim=1) <= largest) & (values.amin(dim=1) >= -largest)
    return finite


def _label_quality(
    method: str, self_conf: torch.Tensor, margin: torch.Tensor, entropy: torch.Tensor | None
) -> torch.Tensor:
    if method == "self_confidence":
        return self_conf
    if method == "normalized_margin":
        return (margin + 1) / 2
    # confidence_weighted_entropy, as cleanlab.rank defines it
    ratio = entropy / self_conf.clamp(min=_CLIP)
    return torch.log(ratio + 1) / ratio.clamp(min=_CLIP)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"`{name}` must be a tensor or array, got {type(value).__name__}") from err
    if array.dtype == object:
        raise ValueError(f"`{name}` must be numeric, got an array of Python objects.")
    if not array.flags.writeable:  # e.g. a pandas frame's values: torch warns on read-only
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def describe(value: Any) -> str:
    """How an argument looked, for error messages: a tensor's shape, or what else it was
    (a numpy array passed where a tensor is needed says how to convert it)."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a {kind} of shape {tuple(shape)} (not a tensor: use torch.as_tensor)"
    return f"a {kind} (not a tensor: use torch.as_tensor)"


def _check_probabilities(probs: torch.Tensor) -> None:
    """Rows of probabilities (non-finite rows are skipped later): logits passed as `probs`
    would give scores outside [0, 1] and meaningless flags, silently."""
    finite = probs[torch.isfinite(probs).all(dim=1)].double()
    if not len(finite):
        return
    sums = finite.sum(dim=1)
    low, high = float(finite.min()), float(finite.max())
    if low < -1e-6 or high > 1 + 1e-6 or float((sums - 1).abs().max()) > 1e-2:
        raise ValueError(
            "`probs` must be probabilities, each row in [0, 1] and summing to 1; found values"
            f" in [{low:.3g}, {high:.3g}] and row sums in [{float(sums.min()):.3g},"
            f" {float(sums.max()):.3g}]. Pass a model's raw outputs as `logits=` instead."
        )


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    if isinstance(class_names, str):
        raise ValueError(
            f"`class_names` must be a list of names, got the string {class_names!r};"
            f" e.g. class_names={[class_names]!r} for one name."
        )
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"`class_names` has {len(names)} names but the model predicts {num_classes} classes;"
            " pass one name per output column, in order."
        )
    return names


def _sample_ids(sample_ids: Sequence[Any] | None, num_samples: int) -> list[Any]:
    if sample_ids is None:
        return list(range(num_samples))
    ids = sample_ids.tolist() if hasattr(sample_ids, "tolist") else list(sample_ids)
    if len(ids) != num_samples:
        raise ValueError(
            f"`sample_ids` has {len(ids)} entries but there are {num_samples} samples;"
            " pass one id per sample."
        )
    _check_id_kinds(ids)
    seen: set[Any] = set()
    duplicates = [i for i in ids if i in seen or seen.add(i)]
    if duplicates:
        raise ValueError(
            "`sample_ids` must be unique within an epoch; duplicated:"
            f" {sorted(set(duplicates))[:10]}."
            " Give every sample a stable unique id (for example its index or file name)."
        )
    return ids


def _check_id_kinds(ids: list[Any]) -> None:
    """Ids are of one kind (integers of any type count as one): a mix sorts nowhere and
    writes no parquet column, and 1 and "1" would name two samples that a CSV round trip
    makes one."""
    kinds = {type(i) for i in ids}
    if len(kinds) <= 1 or all(issubclass(k, str) for k in kinds):
        return
    if all(issubclass(k, numbers.Integral) and not issubclass(k, bool) for k in kinds):
        return
    examples = {}
    for i in ids:
        examples.setdefault(type(i).__name__, i)
    found = ", ".join(f"{kind} (e.g. {value!r})" for kind, value in examples.items())
    raise ValueError(
        f"`sample_ids` must be of one kind, all integers or all strings, say; got {found}."
        " Give every sample an id of one kind (str(i) for each, say)."
    )


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()
