"""One dataloader's validation epochs, scored with what each sample keeps from earlier ones.

:class:`EpochScorer` turns an epoch's captured logits, targets, ids and embeddings into
the per-sample table: the single-epoch scores (:func:`labelwatch.score_predictions`), the
neighbours' label agreement (:mod:`labelwatch.neighbours`), the probabilities averaged
over the epoch history with the combined ``label_quality`` and candidate rule
(:mod:`labelwatch.combined`), flag streaks, and the watched classes' scores
(:mod:`labelwatch.watch`). What a sample keeps from one epoch to the next (the history's
past probabilities, its flag streak and its first watch scores) lives here, on rank zero,
and after a resume is read back from the last epoch's files, not from the checkpoint.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from labelwatch.ann import EXACT_KNN_POINTS
from labelwatch.candidates import first_watch_column, watch_column
from labelwatch.capture import CapturedEpoch
from labelwatch.combined import (
    WITHOUT_NEIGHBOURS,
    HistoryScores,
    history_scores,
    mixed_thresholds,
    reachable_agreement,
)
from labelwatch.history import HISTORY_FILE, EpochHistory
from labelwatch.neighbours import (
    approximate_neighbours,
    has_direction,
    knn_neighbours,
    label_agreement,
    label_distribution,
    neighbour_labels,
)
from labelwatch.scoring import LABEL_QUALITY_METHODS, SAMPLE_COLUMNS, score_predictions
from labelwatch.sinks.local import read_samples
from labelwatch.watch import watch_scores, watched_indices

__all__ = ["EpochScorer", "ScoringOptions", "effective_label_quality", "is_output_column"]

# kNN label agreement: neighbours per sample, and the largest epoch it is computed for on
# a CPU (at epoch end, in the training process: above 8192 samples the approximate search
# of labelwatch.ann, see benchmarks/knn.py; beyond this cap the column is NaN there).
# Embeddings on an accelerator are searched exactly with no cap.
KNN_NEIGHBOURS = 10
KNN_MAX_SAMPLES = 50_000

# What the epoch's table adds to SAMPLE_COLUMNS (and the watched classes' score columns);
# the candidates add their rank, the W&B table its media.
ADDED_COLUMNS = (
    "moved",
    "knn_agreement",
    "flag_streak",
    "averaged_self_confidence",
    "averaged_epochs",
    "is_mixed_confident_mismatch",
    "is_candidate",
    "is_watch_candidate",
    "rank",
    "media",
)


def is_output_column(name: str) -> bool:
    """Whether LabelWatch writes a column of this name (a metadata key must not take it)."""
    prefixes = (watch_column(""), first_watch_column(""))
    return name in SAMPLE_COLUMNS or name in ADDED_COLUMNS or name.startswith(prefixes)


Warn = Callable[[str, str], None]  # (key, message): warn once per key
Kept = TypeVar("Kept", pd.Series, pd.DataFrame)


@dataclass(frozen=True)
class ScoringOptions:
    """The LabelWatch arguments that scoring reads (see ``LabelWatch`` for each)."""

    class_names: Sequence[str] | None
    label_quality: str
    candidate_rule: str
    history_window: int
    history_dtype: torch.dtype
    history_top_k: int | None
    knn_weight: float
    min_knn_agreement: float
    watch_classes: Sequence[str | int]
    min_watch_score: float
    ignore_index: int
    seed: int
    embeddings_dtype: str = "float32"


def effective_label_quality(method: str, have_neighbours: bool) -> str:
    """``method``, or its stand-in when a kNN method has no neighbours this epoch."""
    return method if have_neighbours else WITHOUT_NEIGHBOURS.get(method, method)


class EpochScorer:
    """Scores one validation dataloader's epochs.

    Args:
        options: what to compute.
        warn: ``warn(key, message)`` warns once per key.
        last_dir: the folder of the last epoch written before this fit resumed, whose
            ``samples.parquet`` and ``history.arrow`` hold what the samples carry over;
            None for a fresh fit.
        last_run: the epoch history's step of that epoch (validation runs scored).
        last_epoch: that epoch, for messages.
    """

    def __init__(
        self,
        options: ScoringOptions,
        warn: Warn,
        *,
        last_dir: Path | None = None,
        last_run: int | None = None,
        last_epoch: int | None = None,
    ) -> None:
        self.options = options
        self._warn = warn
        self._last_dir, self._last_run, self._last_epoch = last_dir, last_run, last_epoch
        self._history: EpochHistory | None = None
        # where the history's newest copy is, and its save in flight (on another thread)
        self._history_file: Path | None = None
        self._history_save: Future | None = None
        self._streaks: pd.Series | None = None  # flag streak by sample id
        self._first_watch: pd.DataFrame | None = None  # first watch scores by sample id

    def score(
        self,
        captured: CapturedEpoch,
        epoch: int,
        device_embeddings: torch.Tensor | None = None,
        *,
        run: int,
    ) -> pd.DataFrame:
        """Scores of the host copy ``captured``; neighbours are searched where the embeddings
        were captured (``device_embeddings``, the GPU when the model is there). ``run`` is
        the validation run's step in the epoch history."""
        o = self.options
        single_epoch = o.label_quality in LABEL_QUALITY_METHODS
        with warnings.catch_warnings():  # warned below, once, with the epoch
            warnings.filterwarnings("ignore", message=".*NaN or infinite", category=RuntimeWarning)
            samples = score_predictions(
                logits=captured.logits,
                labels=captured.targets,
                class_names=o.class_names,
                sample_ids=captured.sample_ids,
                epoch=epoch,
                label_quality=o.label_quality if single_epoch else "self_confidence",
                ignore_index=o.ignore_index,
            )
        skipped = samples.attrs["num_nonfinite"]
        if skipped:
            rank_zero_warn(
                f"LabelWatch: {skipped} validation samples had NaN or infinite logits in epoch"
                f" {epoch}; they were left out of scoring."
            )
        # Scoring may drop rows: realign embeddings and metadata by sample id.
        positions = pd.Index(captured.sample_ids).get_indexer(samples["sample_id"])
        for key, values in captured.metadata.items():
            samples[key] = self._metadata_column(key, values)[positions]
        if len(samples) == 0:
            return samples
        index = torch.from_numpy(positions)
        labels = torch.tensor(samples["given_label"].to_numpy(np.int64))
        kept_all = len(index) == len(captured.logits) and bool(
            (index == torch.arange(len(index))).all()
        )  # no row dropped: logits and embeddings need no gather
        embeddings = device_embeddings if device_embeddings is not None else captured.embeddings
        self._count_without_direction(samples, embeddings, None if kept_all else index, epoch)
        neighbour_labels = self._neighbour_labels(embeddings, None if kept_all else index, labels)
        column = samples.columns.get_loc("y")
        samples.insert(column + 1, "moved", np.nan)
        agreement = None
        if neighbour_labels is not None:
            num_classes = len(samples.attrs["class_names"])
            agreement = label_agreement(neighbour_labels, labels, num_classes)
        samples.insert(
            column + 2,
            "knn_agreement",
            agreement.double().numpy() if agreement is not None else np.nan,
        )
        samples.insert(column + 3, "flag_streak", self._flag_streaks(samples))
        logits = captured.logits if kept_all else captured.logits[index]
        self._add_history_columns(samples, logits, labels, neighbour_labels, agreement, run)
        if o.watch_classes:
            if embeddings is not None and not kept_all:
                embeddings = embeddings[index.to(embeddings.device)]
            self._add_watch_columns(samples, embeddings, labels)
        return samples

    # ------------------------------------------------------------------ the epoch history
    def save_history(self, out_dir: Path, executor: Executor) -> None:
        """Write the history beside ``out_dir``'s samples on ``executor``'s thread, off the
        training path; it is not updated again until that save is done."""
        if self._history is not None:
            self._history_save = executor.submit(self._write_history, self._history, out_dir)

    def wait_for_history_save(self) -> None:
        save, self._history_save = self._history_save, None
        if save is not None:
            save.result()

    def _write_history(self, history: EpochHistory, out_dir: Path) -> None:
        """Write the history and drop the previous copy, so the disk holds one ((window - 1)
        x N x C values). A failure warns: the history only lets a resumed run continue its
        average."""
        try:
            path = history.save(out_dir / HISTORY_FILE)
        except Exception as err:  # on its own thread: nothing must escape into training
            rank_zero_warn(f"LabelWatch could not write its epoch history to {out_dir}: {err}")
            return
        previous = self._history_file
        if previous is not None and previous != path:
            previous.unlink(missing_ok=True)
        self._history_file = path

    def _loaded_history(self) -> EpochHistory:
        """The epoch history: in memory, or after a resume read back from the last epoch's
        history.arrow (a fresh one when that file is missing or differs)."""
        if self._history is not None:
            return self._history
        o = self.options
        history = EpochHistory(
            window=o.history_window, dtype=o.history_dtype, top_k=o.history_top_k
        )
        path = self._last_dir / HISTORY_FILE if self._last_dir is not None else None
        if path is not None:
            try:
                loaded = EpochHistory.load(path)
            except (OSError, ValueError, KeyError) as err:
                why = f"({err})"
                if not path.exists():  # saved again by each epoch, deleted from the one before
                    why = (
                        "(only the newest epoch's folder keeps it: was this resumed from an"
                        " older checkpoint, or did the fit stop after a later epoch's scores?)"
                    )
                rank_zero_warn(
                    f"LabelWatch could not read the epoch history {path} {why}; the averaging"
                    " window starts again from this epoch."
                )
            else:
                if (loaded.window, loaded.last_epoch) == (
                    o.history_window,
                    self._last_run,
                ) and loaded.stores_like(o.history_top_k):
                    history = loaded.to(o.history_dtype)
                    self._history_file = path
                else:
                    rank_zero_warn(
                        f"LabelWatch: the epoch history {path} (window {loaded.window}, top_k"
                        f" {loaded.top_k}, validation run {loaded.last_epoch}) does not match"
                        f" `history_window`={o.history_window}, `history_top_k`="
                        f"{o.history_top_k} at run {self._last_run} (epoch {self._last_epoch});"
                        " the averaging window starts again from this epoch."
                    )
        self._history = history
        return history

    def _add_history_columns(
        self,
        samples: pd.DataFrame,
        logits: torch.Tensor,
        labels: torch.Tensor,
        neighbour_labels: torch.Tensor | None,
        agreement: torch.Tensor | None,
        run: int,
    ) -> None:
        """Window-averaged scores, the combined `label_quality`, and the candidate flag.

        ``p_mix = (1 - knn_weight) * averaged + knn_weight * knn`` (``averaged`` alone
        without neighbours). `is_candidate` is confident learning on ``p_mix`` or
        `knn_agreement` below `min_knn_agreement` (rule "combined"), or the single-epoch
        `is_confident_mismatch` (rule "confident_mismatch").

        Memory: a chunk of rows at a time, this epoch's probabilities are softmaxed,
        averaged with the history's past epochs (then stored over the oldest), mixed with
        the neighbours and scored, so no N x C array is made besides the history."""
        o = self.options
        ids = samples["sample_id"].tolist()
        flags = torch.tensor(samples["is_confident_mismatch"].to_numpy(bool))
        self.wait_for_history_save()
        history = self._loaded_history()
        num_classes = logits.shape[1]
        step = history.begin(run, ids, flags, num_classes)
        combined = o.label_quality not in LABEL_QUALITY_METHODS
        if combined and o.label_quality == "knn_agreement" and neighbour_labels is None:
            self._warn(
                "knn-quality",
                "LabelWatch: `label_quality`='knn_agreement' needs embeddings (and at most"
                f" {KNN_MAX_SAMPLES} samples on a CPU); 'averaged_margin' is used instead.",
            )
        given = torch.from_numpy(samples["self_confidence"].to_numpy(np.float32))
        thresholds = mixed_thresholds(
            step.mean_at(labels, given), labels, num_classes, agreement, knn_weight=o.knn_weight
        )
        minimum = torch.full(labels.shape, float(o.min_knn_agreement))
        if neighbour_labels is not None:
            # the classes as the search saw them: rows without neighbours were no keys
            keys = neighbour_labels[:, 0] >= 0 if neighbour_labels.shape[1] else slice(None)
            minimum[keys] *= reachable_agreement(labels[keys], neighbour_labels.shape[1])
        parts = []
        for rows in step.chunks():
            averaged = step.average(rows, torch.softmax(logits[rows].float(), dim=1).cpu())
            knn = None
            if neighbour_labels is not None:
                knn = label_distribution(neighbour_labels[rows], num_classes)
            parts.append(
                history_scores(
                    averaged,
                    labels[rows],
                    knn,
                    method=o.label_quality if combined else None,
                    knn_weight=o.knn_weight,
                    min_knn_agreement=minimum[rows],
                    writable=True,  # a new tensor from the history
                    thresholds=thresholds,
                )
            )
            del averaged, knn
        scores = HistoryScores.concat(parts)
        if scores.quality is not None:
            samples["label_quality"] = scores.quality.double().numpy()
        if o.candidate_rule == "combined":
            candidate = scores.is_candidate
            # A candidate's suggestion comes from p_mix, so it never repeats the given label.
            suggested = samples["suggested_label"].to_numpy(np.int64).copy()
            chosen = candidate.numpy()
            suggested[chosen] = scores.suggested.numpy()[chosen]
            names = np.asarray(samples.attrs["class_names"], dtype=object)
            samples["suggested_label"] = suggested
            samples["suggested_name"] = names[suggested]
        else:
            candidate = flags
        samples["averaged_self_confidence"] = scores.averaged_self_confidence.double().numpy()
        samples["averaged_epochs"] = history.filled(ids).numpy()
        samples["is_mixed_confident_mismatch"] = scores.is_mixed_confident_mismatch.numpy()
        samples["is_candidate"] = candidate.numpy()

    # ------------------------------------------------------------------ neighbours, watch
    def _count_without_direction(
        self,
        samples: pd.DataFrame,
        embeddings: torch.Tensor | None,
        rows: torch.Tensor | None,
        epoch: int,
    ) -> None:
        """Count (in ``samples.attrs``, for summary.json) and warn about the scored rows whose
        embedding has no direction (:func:`has_direction`): they get no neighbours, no watch
        scores and no place on the map, but keep every score from their logits."""
        samples.attrs["num_nonfinite_embeddings"] = samples.attrs["num_zero_embeddings"] = 0
        if embeddings is None or embeddings.shape[1] == 0:
            return
        directed = has_direction(embeddings)
        if rows is not None:
            directed = directed[rows.to(directed.device)]
        if bool(directed.all()):
            return
        lost = (~directed).nonzero().squeeze(1)
        if rows is not None:
            lost = rows.to(lost.device)[lost]
        bad = embeddings[lost]  # only these rows: no N x D mask
        finite = torch.isfinite(bad).all(dim=1)
        nonfinite, zero = int((~finite).sum()), int(finite.sum())
        samples.attrs["num_nonfinite_embeddings"] = nonfinite
        samples.attrs["num_zero_embeddings"] = zero
        causes = []
        if nonfinite:
            cause = f"{nonfinite} had NaN or infinite embeddings"
            if self.options.embeddings_dtype == "float16" and bool(torch.isinf(bad).any()):
                cause += (
                    " (`embeddings_dtype`='float16' overflows above 65504: use"
                    " `embeddings_dtype`='float32')"
                )
            causes.append(cause)
        if zero:
            causes.append(f"{zero} had all-zero embeddings (dead units, or silent inputs?)")
        rank_zero_warn(
            f"LabelWatch: of the validation samples of epoch {epoch}, {' and '.join(causes)};"
            " they have no neighbours (knn_agreement NaN, p_mix their averaged"
            " probabilities), no watch scores and no place on the map."
        )

    def _neighbour_labels(
        self, embeddings: torch.Tensor | None, rows: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor | None:
        """``(N, k)`` given labels of each scored sample's 10 nearest neighbours (cosine),
        searched on the embeddings' device among the scored ``rows`` (None: all), -1 for
        a row without a direction; None without embeddings, or on a CPU above
        KNN_MAX_SAMPLES. Kept as labels, not an N x C distribution, to save memory."""
        if embeddings is None:
            return None
        on_cpu = embeddings.device.type == "cpu"
        if on_cpu and len(labels) > KNN_MAX_SAMPLES:
            self._warn(
                "knn-cap",
                f"LabelWatch: {len(labels)} samples with embeddings on a CPU; the neighbourhood"
                f" search stops at {KNN_MAX_SAMPLES} there, so knn_agreement is NaN, the"
                " ranking is averaged_margin and the candidate rule is confident learning on"
                " the averaged probabilities. Embeddings on a GPU have no such cap.",
            )
            return None
        if embeddings.shape[1] < 2:
            self._warn(
                "1-d-embeddings",
                "LabelWatch: the embeddings have one dimension, where cosine similarity is only"
                " +1 or -1, so nearest neighbours would be arbitrary; knn_agreement is left out"
                " (NaN). Pick a wider layer as the embeddings (e.g. `embedding_layer`).",
            )
            return None
        if rows is not None:
            embeddings = embeddings[rows.to(embeddings.device)]
        if on_cpu and len(embeddings) > EXACT_KNN_POINTS:  # exact is O(N^2 D) on 2 cores
            neighbours = approximate_neighbours(
                embeddings, k=KNN_NEIGHBOURS, seed=self.options.seed
            )
        else:
            neighbours = knn_neighbours(embeddings, k=KNN_NEIGHBOURS).cpu()
        return neighbour_labels(labels, neighbours)

    def _add_watch_columns(
        self, samples: pd.DataFrame, embeddings: torch.Tensor | None, labels: torch.Tensor
    ) -> None:
        """A `watch_<class>` score per watched class (:mod:`labelwatch.watch`), and
        `first_watch_<class>`, the sample's score in the first validation that scored it. A
        sample with either at `min_watch_score` or more for a class becomes a candidate
        (`is_watch_candidate`), suggested as that class unless the candidate rule already
        flags it.

        Why the first validation: the model learns the annotators' habits as it trains.
        Early on, a bark over a siren still leans toward the sirens; once the model has
        learned from its training clips that such a clip is called `dog_bark`, it may no
        longer lean."""
        names = list(samples.attrs["class_names"])
        watched = watched_indices(self.options.watch_classes, names)
        if embeddings is None or embeddings.shape[1] < 2:
            self._warn(
                "watch-no-embeddings",
                "LabelWatch: `watch_classes` needs embeddings of two or more dimensions (set"
                " `embedding_layer` or return `embeddings` from validation_step); the watch"
                " scores are NaN and flag nothing.",
            )
            scores = torch.full((len(labels), len(watched)), float("nan"))
        else:
            predictions = torch.tensor(samples["predicted_label"].to_numpy(np.int64))
            scores = watch_scores(embeddings, labels, watched, len(names), predictions=predictions)
        classes = [names[index] for index in watched]
        absent = [names[i] for i in watched if not bool((labels == i).any())]
        if absent:
            self._warn(
                f"watch-absent-{absent}",
                f"LabelWatch: no validation sample is labelled {', '.join(map(repr, absent))}:"
                " the watch learns what a class is from its samples, so its watch scores are"
                " NaN and flag nothing.",
            )
        for watched_name, values in zip(classes, scores.double().numpy().T, strict=True):
            samples[watch_column(watched_name)] = values
        first = self._first_watch_scores(samples, classes)
        for watched_name, values in zip(classes, first.T, strict=True):
            samples[first_watch_column(watched_name)] = values
        # Either score flags; NaN is no score and flags nothing.
        scores = torch.from_numpy(np.fmax(scores.double().numpy(), first))
        scores = torch.nan_to_num(scores, nan=-math.inf)
        flagged = (scores >= self.options.min_watch_score).any(dim=1).numpy()
        only_watched = flagged & ~samples["is_candidate"].to_numpy(bool)
        if only_watched.any():
            best = scores.argmax(dim=1).numpy()
            suggested = samples["suggested_label"].to_numpy(np.int64).copy()
            suggested[only_watched] = np.asarray(watched)[best[only_watched]]
            samples["suggested_label"] = suggested
            samples["suggested_name"] = np.asarray(names, dtype=object)[suggested]
        samples["is_watch_candidate"] = flagged
        samples["is_candidate"] = samples["is_candidate"].to_numpy(bool) | flagged

    # ------------------------------------------------------------------ carried by id
    def _metadata_column(self, key: str, values: Sequence[object]) -> np.ndarray:
        """One object per sample, as parquet can store it: paths as strings, and a column
        that mixes kinds (numbers and strings, or holds lists) as text, with a warning."""
        column = np.empty(len(values), dtype=object)
        for row, value in enumerate(values):  # element by element: lists stay cells
            column[row] = os.fspath(value) if isinstance(value, os.PathLike) else value
        kinds = {_kind(value) for value in column if value is not None}
        if len(kinds) > 1 or "other" in kinds:
            self._warn(
                f"metadata-{key}",
                f"LabelWatch: metadata {key!r} holds values of several kinds"
                f" ({', '.join(sorted(kinds))}); it is written as text. Give each sample one"
                " number or one string.",
            )
            column[:] = [None if value is None else str(value) for value in column]
        return column

    def _first_watch_scores(self, samples: pd.DataFrame, classes: list[str]) -> np.ndarray:
        """``(N, W)`` watch scores of each sample's first scored validation: this one's for
        a sample not seen before; kept by id across epochs and, after a resume, read back
        from the last epoch's samples.parquet."""
        columns = [watch_column(c) for c in classes]
        firsts = [first_watch_column(c) for c in classes]
        previous = self._first_watch
        if previous is None:  # a class watched only since the resume has no column there
            last = read_samples(self._last_dir, ["sample_id", *firsts], require_all=False)
            previous = last.set_index("sample_id") if last is not None else pd.DataFrame()
        kept = [c for c in firsts if c in previous.columns]  # the others start now
        now = pd.DataFrame(samples[columns].to_numpy(), index=samples["sample_id"], columns=firsts)
        known = ids_in(now.index, previous.index)
        now.loc[known, kept] = previous.loc[now.index[known], kept].to_numpy()
        self._first_watch = _kept_with(previous, now)
        return now.to_numpy(np.float64)

    def _flag_streaks(self, samples: pd.DataFrame) -> np.ndarray:
        """Consecutive epochs each sample has been a confident mismatch, this one included.

        A sample missing from an epoch keeps its streak; after a resume the streaks are
        read back from the last epoch's samples.parquet."""
        previous = self._streaks
        if previous is None:
            last = read_samples(self._last_dir, ["sample_id", "flag_streak"])
            previous = (
                pd.Series(last["flag_streak"].to_numpy(np.int64), index=last["sample_id"])
                if last is not None
                else pd.Series([], dtype=np.int64)
            )
        ids = pd.Index(samples["sample_id"])
        flagged = samples["is_confident_mismatch"].to_numpy(bool)
        before = previous.reindex(ids).fillna(0).to_numpy(np.int64)
        streak = np.where(flagged, before + 1, 0)
        # A Series, not a dict: a tenth of the memory at 100k ids.
        self._streaks = _kept_with(previous, pd.Series(streak, index=ids))
        return streak


def ids_in(ids: pd.Index, others: pd.Index) -> np.ndarray:
    """``ids.isin(others)`` through a hash table: pandas' ``isin`` on string ids (pyarrow
    strings) makes a pyarrow scalar of each value, 50 times slower at 900 ids."""
    if others.is_unique:
        return others.get_indexer(ids) >= 0
    return ids.isin(others)


def _kind(value: object) -> str:
    """What parquet stores a metadata value as: numbers, strings, bytes or else."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "bytes" if isinstance(value, bytes) else "other"


def _kept_with(previous: Kept, now: Kept) -> Kept:
    """``now``, plus the rows of ``previous`` whose ids are missing from it: their values
    are kept for when they come back."""
    missing = previous[~ids_in(previous.index, now.index)]
    return pd.concat([missing, now]) if len(missing) else now
