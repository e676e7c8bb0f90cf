"""LabelWatch: watch the labels of the validation set while a model trains."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shlex
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import (
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from labelwatch.candidates import select_candidates
from labelwatch.capture import (
    CapturedEpoch,
    EpochBuffer,
    LayerTap,
    destroy_gloo_group_at_exit,
    find_submodule,
    merge_ranks,
)
from labelwatch.combined import (
    COMBINED_METHODS,
    DEFAULT_KNN_WEIGHT,
    DEFAULT_MIN_KNN_AGREEMENT,
    CombinedMethod,
)
from labelwatch.epoch_scoring import (
    EpochScorer,
    ScoringOptions,
    effective_label_quality,
    ids_in,
    is_output_column,
)
from labelwatch.media import _FromPath
from labelwatch.neighbours import has_direction
from labelwatch.projection import (
    MapJob,
    MapResult,
    MapWorker,
    ProjectionMethod,
    check_projection,
    compute_map,
    id_priority,
    stratified_subsample,
)
from labelwatch.scoring import (
    LABEL_QUALITY_METHODS,
    LabelQualityMethod,
    check_predictions,
)
from labelwatch.sinks import LocalSink, WandbSink, find_wandb_logger
from labelwatch.sinks.local import read_samples
from labelwatch.watch import DEFAULT_MIN_WATCH_SCORE, watched_indices

__all__ = ["LabelWatch", "LabelWatchLogic"]

log = logging.getLogger(__name__)

MediaFn = Callable[[Mapping[str, Any]], Any]
_EMBEDDINGS_DTYPES = {"float32": None, "float16": torch.float16}
_LOGITS_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_HISTORY_DTYPES = {"float32": torch.float32, "float16": torch.float16}
CANDIDATE_RULES: tuple[str, ...] = ("combined", "confident_mismatch")
CandidateRule = Literal["combined", "confident_mismatch"]
ALL_LABEL_QUALITY_METHODS: tuple[str, ...] = (*COMBINED_METHODS, *LABEL_QUALITY_METHODS)


@dataclass
class _PendingEpoch:
    """An epoch whose scores are written and whose map (and W&B logging) may be pending."""

    epoch: int
    step: int
    name: str | None
    samples: pd.DataFrame
    candidates: pd.DataFrame
    summary: dict[str, Any]
    out_dir: Path | None = None
    written: bool = False
    map: Future | None = None  # None once cancelled: logged without coordinates
    rows: np.ndarray | None = None  # the rows mapped and logged (all, or a subsample)


def _id_kind(sample_ids: Sequence[Any]) -> str | None:
    """What kind of ids an epoch has: numbers match only numbers, strings only strings."""
    if not len(sample_ids):
        return None
    first = sample_ids[0]
    return "integers" if isinstance(first, (int, np.integer)) else type(first).__name__


def _describe(value: Any) -> str:
    """A returned value, for an error message: its type, and a tensor's shape or a dict's
    keys."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, not a dict"
    if isinstance(value, Mapping):
        return f"a dict with the keys {list(value)}"
    return f"a {type(value).__name__}, not a dict"


class LabelWatchLogic:
    """Everything LabelWatch does, independent of which Lightning package runs it.

    ``labelwatch.LabelWatch`` mixes it into ``lightning.pytorch.Callback`` and
    ``labelwatch.pl.LabelWatch`` into ``pytorch_lightning.Callback``.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        *,
        logits_key: str = "logits",
        embeddings_key: str = "embeddings",
        target_key: str = "target",
        sample_id_key: str = "sample_id",
        logits_layer: str | None = None,
        embedding_layer: str | None = None,
        metadata_keys: Sequence[str] = (),
        dataloaders: Sequence[int | str] | None = None,
        every_n_epochs: int = 1,
        projection: ProjectionMethod = "umap",
        label_quality: CombinedMethod | LabelQualityMethod = "knn_mixed_margin",
        candidate_rule: CandidateRule = "combined",
        history_window: int = 3,
        knn_weight: float = DEFAULT_KNN_WEIGHT,
        min_knn_agreement: float = DEFAULT_MIN_KNN_AGREEMENT,
        max_candidates: int | None = None,
        watch_classes: Sequence[str | int] | None = None,
        min_watch_score: float = DEFAULT_MIN_WATCH_SCORE,
        ignore_index: int = -100,
        dirpath: str | Path | None = None,
        table_key: str = "labelwatch/samples",
        media_fn: MediaFn | None = None,
        max_media_rows: int = 200,
        embeddings_dtype: Literal["float32", "float16"] = "float32",
        logits_dtype: Literal["float32", "float16"] = "float32",
        history_dtype: Literal["float32", "float16"] = "float32",
        history_top_k: int | None = 10,
        offload_to_cpu: bool = False,
        max_points: int = 10_000,
        map_in_background: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("every_n_epochs", every_n_epochs, minimum=1)
        check_projection(projection)
        _check_int("max_points", max_points, minimum=1)
        if label_quality not in ALL_LABEL_QUALITY_METHODS:
            raise ValueError(
                f"`label_quality` must be one of {ALL_LABEL_QUALITY_METHODS}, got {label_quality!r}"
            )
        if candidate_rule not in CANDIDATE_RULES:
            raise ValueError(
                f"`candidate_rule` must be one of {CANDIDATE_RULES}, got {candidate_rule!r}"
            )
        _check_int("history_window", history_window, minimum=1)
        fractions = (("knn_weight", knn_weight), ("min_knn_agreement", min_knn_agreement))
        for argument, value in fractions:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0.0 <= value <= 1.0)
            ):
                raise ValueError(f"`{argument}` must be a number in [0, 1], got {value!r}")
        _check_int("max_candidates", max_candidates, minimum=0, optional=True)
        _check_int("max_media_rows", max_media_rows, minimum=0)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"`ignore_index` must be an integer, got {ignore_index!r}")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be a path (str or os.PathLike), got {dirpath!r}")
        if dirpath is not None and "://" in str(dirpath):
            raise ValueError(
                f"`dirpath` must be a local folder, got the URL {str(dirpath)!r}: LabelWatch"
                " writes local files (W&B gets them as an artifact)."
            )
        for argument, value in (
            ("logits_key", logits_key),
            ("embeddings_key", embeddings_key),
            ("target_key", target_key),
            ("sample_id_key", sample_id_key),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{argument}` must be a non-empty string, got {value!r}")
        for argument, value in (
            ("logits_layer", logits_layer),
            ("embedding_layer", embedding_layer),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"`{argument}` must be None or a submodule's name as in"
                    f" `model.named_modules()` (e.g. 'backbone.fc'), got {value!r}"
                )
        for argument, value in (
            ("offload_to_cpu", offload_to_cpu),
            ("map_in_background", map_in_background),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be True or False, got {value!r}")
        if media_fn is not None and not callable(media_fn):
            raise ValueError(
                "`media_fn` must be None or a callable row -> W&B media, e.g."
                f" labelwatch.media.AudioFromPath(root=...); got {media_fn!r}"
            )
        _check_int("seed", seed, minimum=0)
        if seed > 2**32 - 1:  # numpy's and UMAP's seeds are 32-bit
            raise ValueError(f"`seed` must be an integer in [0, 2**32 - 1], got {seed!r}")
        class_names = _name_list("class_names", class_names, example="['dog', 'siren']")
        if class_names is not None:
            bad = [n for n in class_names if not isinstance(n, str) or not n]
            if bad:
                raise ValueError(f"`class_names` must be non-empty strings, got {bad}")
            repeated = sorted(str(n) for n, count in Counter(class_names).items() if count > 1)
            if repeated:
                raise ValueError(
                    f"`class_names` must be unique (one per class index), got {repeated} more"
                    " than once"
                )
        metadata_keys = _name_list("metadata_keys", metadata_keys, example="['path']")
        taken = [key for key in metadata_keys or () if is_output_column(str(key))]
        if taken:
            raise ValueError(
                f"`metadata_keys` {taken} would overwrite columns that LabelWatch writes; give"
                " those values other keys in the batch (e.g. 'meta_epoch')."
            )
        watch_classes = _name_list("watch_classes", watch_classes, example="['siren']")
        if watch_classes is not None and class_names is not None:
            watched_indices(watch_classes, class_names)  # a misspelt name fails here
        if (
            isinstance(min_watch_score, bool)
            or not isinstance(min_watch_score, (int, float))
            or not 0 < min_watch_score < math.inf
        ):
            raise ValueError(
                f"`min_watch_score` must be a finite number > 0, got {min_watch_score!r}"
            )
        dataloaders = _name_list("dataloaders", dataloaders, example="[0] or ['clean']")
        if embeddings_dtype not in _EMBEDDINGS_DTYPES:
            raise ValueError(
                f"`embeddings_dtype` must be one of {tuple(_EMBEDDINGS_DTYPES)},"
                f" got {embeddings_dtype!r}"
            )
        if logits_dtype not in _LOGITS_DTYPES:
            raise ValueError(
                f"`logits_dtype` must be one of {tuple(_LOGITS_DTYPES)}, got {logits_dtype!r}"
            )
        if history_dtype not in _HISTORY_DTYPES:
            raise ValueError(
                f"`history_dtype` must be one of {tuple(_HISTORY_DTYPES)}, got {history_dtype!r}"
            )
        _check_int("history_top_k", history_top_k, minimum=1, optional=True)
        if not isinstance(table_key, str) or not all(table_key.partition("/")[::2]):
            raise ValueError(
                "`table_key` must look like 'prefix/name' (e.g. 'labelwatch/samples'),"
                f" got {table_key!r}"
            )
        self.class_names = class_names
        self.logits_key = logits_key
        self.embeddings_key = embeddings_key
        self.target_key = target_key
        self.sample_id_key = sample_id_key
        self.logits_layer = logits_layer
        self.embedding_layer = embedding_layer
        self.metadata_keys = tuple(metadata_keys or ())
        self.dataloaders = dataloaders
        self.every_n_epochs = every_n_epochs
        self.projection = projection
        self.label_quality = label_quality
        self.candidate_rule = candidate_rule
        self.history_window = history_window
        self.knn_weight = float(knn_weight)
        self.min_knn_agreement = float(min_knn_agreement)
        self.max_candidates = max_candidates
        self.watch_classes = tuple(watch_classes or ())
        self.min_watch_score = float(min_watch_score)
        self.ignore_index = ignore_index
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.table_key = table_key
        self.media_fn = media_fn
        self.max_media_rows = max_media_rows
        self.embeddings_dtype = embeddings_dtype
        self.logits_dtype = logits_dtype
        self.history_dtype = history_dtype
        self.history_top_k = history_top_k
        self.offload_to_cpu = offload_to_cpu
        self.max_points = max_points
        self.map_in_background = map_in_background
        self.seed = seed

        self.last_epoch: int | None = None
        self.last_run: int | None = None  # validation runs scored, from 0: the history's steps
        self.output_root: Path | None = None  # resolved once, kept across a resume
        self.last_output_dir: Path | None = None
        self._buffers: dict[int, EpochBuffer] | None = None
        self._sanity_checking = False
        self._skipped_epoch: int | None = None  # the last validation's epoch, if skipped
        # Capture slabs kept between epochs (per dataloader), so their pages are touched
        # once per fit, not every epoch; released when fitting ends.
        self._spare_slabs: dict[int, dict[str, torch.Tensor]] = {}
        self._watched: dict[int, str | None] = {}
        self._worker: MapWorker | None = None
        self._map_off = False  # the worker died: no more maps this fit
        self._media_off = False  # the fit was interrupted: log what waits, without media
        # W&B tables are built and logged on this thread, in epoch order, so that their
        # per-row type checks (~0.4 ms a row) do not hold up the training loop; the local
        # files are rewritten here too once a background map adds coordinates.
        self._logging: ThreadPoolExecutor | None = None
        self._last_logged: Future | None = None  # the newest job handed to that thread
        self._pending: deque[_PendingEpoch] = deque()
        self._previous_maps: dict[str | None, dict[Any, tuple[float, float]]] = {}
        self._previous_epochs: dict[str | None, int] = {}
        # Per dataloader, the last scored epoch: (epoch, candidates, samples, folder).
        self._last_results: dict[str | None, tuple[int, int, int, Path]] = {}
        # Per dataloader: its scores and what its samples carry from epoch to epoch (rank
        # zero only): the epoch history (on disk, not in the checkpoint), flag streaks and
        # first watch scores.
        self._scorers: dict[str | None, EpochScorer] = {}
        self._id_kinds: dict[str | None, str | None] = {}  # each dataloader's last ids' kind
        # the checkpoint's last epoch, on a resume, until the epochs after it are set aside
        self._resumed_after: int | None = None
        # The history file ((window - 1) x N x C floats, 0.8 GB at 100k x 1000) is written on its
        # own thread; a history is not updated again until its previous save is done.
        self._history_saver: ThreadPoolExecutor | None = None
        self._logits_tap: LayerTap | None = None
        self._embedding_tap: LayerTap | None = None
        self._wandb: WandbSink | None = None
        self._warned: set[str] = set()
        self._fitted_by: weakref.ref | None = None  # the Trainer of the last fit

    @property
    def state_key(self) -> str:
        # Two LabelWatch callbacks in one Trainer need different keys: watching different
        # dataloaders is enough (default arguments keep the key that checkpoints hold).
        chosen = {"dataloaders": self.dataloaders} if self.dataloaders is not None else {}
        return self._generate_state_key(
            table_key=self.table_key, logits_key=self.logits_key, **chosen
        )

    # ----------------------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            if self._fitted_by is not None and self._fitted_by() is not trainer:
                self._start_afresh()  # another Trainer: its own folder, unless it resumes
            self._fitted_by = weakref.ref(trainer)
            self._skipped_epoch = None
            self._warn_if_validating_within_epochs(trainer)
            self._warn_if_epochs_rarely_line_up(trainer)
        # Fail before training starts when a layer name is wrong.
        for argument, name in (
            ("logits_layer", self.logits_layer),
            ("embedding_layer", self.embedding_layer),
        ):
            if name is not None:
                find_submodule(pl_module, name, argument)
        logger = find_wandb_logger(trainer.loggers)
        self._wandb = WandbSink(logger, table_key=self.table_key) if logger is not None else None
        if self._wandb is not None and stage == "fit" and trainer.is_global_zero:
            self._warn_if_media_go_astray(self._wandb)
        self._map_off = self._media_off = False
        if stage == "fit" and trainer.is_global_zero and self._wants_worker():
            # Started now so numba compiles while the first epoch trains.
            self._worker = MapWorker(
                warm_up=self.projection == "umap",
                seed=self.seed,
                # A projection function defined in the training script is found there.
                import_main=getattr(self.projection, "__module__", None) == "__main__",
            )

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._buffers = None
        if trainer.state.fn != "fit":
            self._warn_once(
                "not-fit",
                "LabelWatch watches the validation epochs of Trainer.fit only; this"
                f" trainer.{getattr(trainer.state.fn, 'value', trainer.state.fn)}() run is not"
                " scored or logged.",
            )
            return
        # The sanity check's batches are captured and checked but never scored: a missing key,
        # a wrong shape or label fails there, before the first training epoch, not after it.
        self._sanity_checking = trainer.sanity_checking
        skips = not self._sanity_checking and self._skips_epoch(trainer)
        self._skipped_epoch = trainer.current_epoch if skips else None
        if skips:
            return
        self._buffers = {}
        self._watched = self._watched_dataloaders(trainer)
        if self.logits_layer is not None:
            self._logits_tap = LayerTap(
                find_submodule(pl_module, self.logits_layer, "logits_layer")
            )
        if self.embedding_layer is not None:
            module = find_submodule(pl_module, self.embedding_layer, "embedding_layer")
            self._embedding_tap = LayerTap(module)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        tapped_logits = self._logits_tap.pop() if self._logits_tap else None
        tapped_embeddings = self._embedding_tap.pop() if self._embedding_tap else None
        if self._buffers is None or dataloader_idx not in self._watched:
            return
        out = outputs if isinstance(outputs, Mapping) else {}
        logits = out.get(self.logits_key)
        if logits is None and tapped_logits is not None:
            logits = self._tapped("logits_layer", self.logits_layer, *tapped_logits)
        if logits is None:
            got = "nothing" if outputs is None else _describe(outputs)
            raise ValueError(
                f"LabelWatch found no logits: validation_step returned {got}. Return a dict"
                f" with {self.logits_key!r} ({{{self.logits_key!r}: logits, ...}}), or set"
                " `logits_layer` to the name of the submodule that outputs them (e.g."
                " LabelWatch(logits_layer='classifier'))."
            )
        embeddings = out.get(self.embeddings_key)
        if embeddings is None and tapped_embeddings is not None:
            embeddings = self._tapped("embedding_layer", self.embedding_layer, *tapped_embeddings)
        if dataloader_idx not in self._buffers:
            batches = trainer.num_val_batches[dataloader_idx]
            expected = int(batches * len(logits)) if math.isfinite(batches) else None
            checking = self._sanity_checking  # a few batches: no preallocation, no reuse
            self._buffers[dataloader_idx] = EpochBuffer(
                expected_rows=None if checking else expected,
                embeddings_dtype=_EMBEDDINGS_DTYPES[self.embeddings_dtype],
                logits_dtype=_LOGITS_DTYPES[self.logits_dtype],
                offload_to_cpu=self.offload_to_cpu,
                reuse=None if checking else self._spare_slabs.pop(dataloader_idx, None),
            )
        sample_ids = self._sample_ids(out, batch, trainer.world_size)
        if sample_ids is None and self._buffers[dataloader_idx].num_batches == 0:
            self._check_not_shuffled(trainer, dataloader_idx)
        self._buffers[dataloader_idx].add(
            logits,
            self._targets(out, batch),
            sample_ids,
            embeddings=embeddings,
            metadata=self._metadata(batch),
        )

    def _tapped(
        self, argument: str, layer: str | None, output: Any, calls: int, other: str | None
    ) -> torch.Tensor | None:
        """A hooked layer's output for this batch; what went wrong with it is said here."""
        what, key = {
            "logits_layer": ("logits", self.logits_key),
            "embedding_layer": ("embeddings", self.embeddings_key),
        }[argument]
        returned = f"`{{{key!r}: ...}}`"  # how validation_step would return them
        if calls == 0 or other is not None:
            problem = "did not run" if calls == 0 else f"returned a {other}, not a tensor"
            message = (
                f"LabelWatch: `{argument}`={layer!r} {problem} in a validation step; return"
                f" the {what} from validation_step ({returned}) or hook a layer that outputs"
                " a tensor of them."
            )
            if argument == "logits_layer":
                raise ValueError(message)
            self._warn_once(f"tap-{argument}", message + " Without them there is no map.")
            return None
        if calls > 1:
            self._warn_once(
                f"tap-twice-{argument}",
                f"LabelWatch: `{argument}`={layer!r} ran {calls} times in one validation step"
                " (test-time augmentation, a second pass?); only its last output is kept."
                f" Return the {what} to score from validation_step instead ({returned}).",
            )
        return output

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove_taps()
        if self._buffers is None:
            return
        buffers, self._buffers = self._buffers, None
        if self._sanity_checking:  # each rank checks its own batches, with no collective
            for buffer in buffers.values():
                self._check_captured(buffer.collect())
            return
        # The epoch history counts validation runs, not epochs: a Trainer may validate
        # several times per epoch (val_check_interval), and each run is one step of it.
        run = 0 if self.last_run is None else self.last_run + 1
        # Every rank walks the same dataloaders, so the collectives inside line up.
        for index, name in self._watched.items():
            buffer = buffers.get(index)
            captured = merge_ranks(buffer.collect() if buffer is not None else None)
            if trainer.is_global_zero:
                self._run_epoch_end(trainer, captured, name, run)
            del captured  # scored and copied where kept: its slabs can be written over
            if buffer is not None:
                self._spare_slabs[index] = buffer.slabs()
        if trainer.is_global_zero:
            self.last_epoch, self.last_run = trainer.current_epoch, run

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self._pending:  # cheap: only checks whether a background map has landed
            self._finish_maps(wait=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending:
            self._finish_maps(wait=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._skipped_epoch is not None:
            scored = f"epoch {self.last_epoch}" if self.last_epoch is not None else "none"
            self._warn_once(
                "final-not-scored",
                f"LabelWatch: the fit's last validation (epoch {self._skipped_epoch}) was"
                f" not scored: every_n_epochs={self.every_n_epochs} skips it, and no later"
                " validation came (early stopping, max_steps in mid-epoch and"
                " check_val_every_n_epoch can end a fit so); the last scored epoch is"
                f" {scored}. every_n_epochs=1 scores every validation.",
            )
        if self._skipped_epoch is None and not self._last_results and trainer.is_global_zero:
            self._warn_once(
                "nothing-scored",
                "LabelWatch scored no validation in this fit: none ran (no validation"
                " dataloader, limit_val_batches=0, or check_val_every_n_epoch beyond"
                " max_epochs), or none had samples. No outputs were written.",
            )
        # The wait can take a while at 100k samples: say why fit lingers.
        waiting = []
        maps = sum(p.map is not None and not p.map.done() for p in self._pending)
        if maps:
            waiting.append(f"{maps} map(s)")
        if self._last_logged is not None and not self._last_logged.done():
            waiting.append("the W&B logging" if self._wandb is not None else "the file writing")
        if waiting:
            rank_zero_info(
                f"LabelWatch: finishing {' and '.join(waiting)} of the last epochs before fit"
                f" returns (outputs: {self.output_root})"
            )
        self._finish_maps(wait=True)
        self._wait_for_history_saves()
        self._wait_for_logging()
        self._say_where_the_candidates_are()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning skips teardown after an exception: free the capture memory (on the
        # model's device) and unhook the model here, for a notebook that retries. The
        # epochs still waiting to be logged go without media: a slow media_fn would hold
        # a Ctrl-C for as long as their media take.
        self._media_off = True
        steps = (
            self._release_capture,
            # Interrupted: log what is outstanding now, without coordinates, rather than
            # lose it.
            lambda: self._finish_maps(wait=False, give_up=True),
            self._stop_worker,
            self._wait_for_history_saves,
            self._wait_for_logging,
        )
        for step in steps:  # each on its own: one that fails must not leak the others
            try:
                step()
            except Exception as err:  # never mask the exception that stopped the fit
                log.debug("LabelWatch: cleanup after an exception failed", exc_info=True)
                rank_zero_warn(
                    f"LabelWatch could not finish its outputs after the fit's error"
                    f" ({type(err).__name__}: {err})."
                )
        # The error may have struck mid epoch end, after a scorer moved on to a validation
        # run that `last_run` does not count: a retry reads the state back from the files.
        for state in (self._scorers, self._previous_maps, self._previous_epochs):
            state.clear()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release_capture()
        self._finish_maps(wait=True)
        self._stop_worker()
        self._wait_for_history_saves()
        self._wait_for_logging()
        if stage == "fit":  # only after a fit that ended well: no collective is in flight
            destroy_gloo_group_at_exit()

    def _say_where_the_candidates_are(self) -> None:
        """One line per watched dataloader at the end of fit: how many candidates its last
        scored epoch has, and where they are."""
        for name, (epoch, candidates, samples, out_dir) in self._last_results.items():
            csv = out_dir / "candidates.csv"
            if not csv.is_file():  # not written: a warning said why
                continue
            which = f" ({name})" if name is not None else ""
            rank_zero_info(
                f"LabelWatch{which}: {candidates} relabel candidates among {samples} validation"
                f" samples in epoch {epoch}: {csv} (or `labelwatch candidates"
                f" {shlex.quote(str(out_dir.parent))} --top 20`)"
            )

    def _release_capture(self) -> None:
        self._remove_taps()
        self._buffers = None
        self._spare_slabs = {}

    def _wait_for_history_saves(self) -> None:
        """Block until every history handed to the saving thread is on disk."""
        if self._history_saver is not None:
            self._history_saver.shutdown(wait=True)
            self._history_saver = None

    def _wait_for_logging(self) -> None:
        """Block until everything handed to the logging thread is done."""
        if self._logging is not None:
            self._logging.shutdown(wait=True)
            self._logging = None

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def _lose_worker(self, err: BaseException) -> None:
        """The map worker died: the rest of this fit goes on without maps (a worker
        killed for memory would likely die again), and its epochs are still logged."""
        self._warn_once(
            "worker-died",
            f"LabelWatch: the map worker process died ({type(err).__name__}: {err}); the"
            " following epochs are scored and logged without maps. Lower `max_points`, or"
            " use projection='pca', if it ran out of memory.",
        )
        self._stop_worker()
        self._map_off = True

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint must not count a validation run whose history is not on disk yet.
        self._wait_for_history_saves()
        root = self.output_root
        return {
            "last_epoch": self.last_epoch,
            "last_run": self.last_run,
            "output_root": str(root) if root is not None else None,
            # for a resume from another working directory (output_root may be relative)
            "output_root_absolute": str(root.absolute()) if root is not None else None,
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Before ``load_state_dict``, which Lightning calls only under this callback's own
        state key: a resume that changed `dataloaders` or `table_key` changed that key, and
        the fit would start afresh. With one LabelWatch on each side, its state is taken."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        saved = [k for k in states if isinstance(k, str) and k.startswith("LabelWatch{")]
        watches = [c for c in trainer.callbacks if isinstance(c, LabelWatchLogic)]
        if len(saved) == 1 and len(watches) == 1:
            rank_zero_warn(
                f"LabelWatch: the checkpoint holds LabelWatch's state under {saved[0]}, and"
                f" this one's key is {self.state_key} (other `dataloaders` or `table_key`);"
                " the fit continues from that state. Ignore Lightning's warning about it."
            )
            self.load_state_dict(states[saved[0]])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict.get("last_epoch")
        self._resumed_after = self.last_epoch  # epochs beyond it are of an abandoned fit
        # Checkpoints from before runs were counted keyed the history by epoch.
        self.last_run = state_dict.get("last_run", self.last_epoch)
        root, absolute = state_dict.get("output_root"), state_dict.get("output_root_absolute")
        if root is not None and self.dirpath is None:
            # The folder where it is now: relative to here (the run moved with its outputs),
            # else where it was written (a resume started elsewhere); when neither exists
            # (an absolute path moved away), the Trainer's folder, as for a new fit.
            found = [Path(p) for p in (root, absolute) if p is not None and Path(p).is_dir()]
            self.output_root = found[0] if found else None

    # ----------------------------------------------------------------------------- helpers
    def _warn_if_validating_within_epochs(self, trainer: Any) -> None:
        interval = getattr(trainer, "val_check_interval", 1.0)
        once = isinstance(interval, float) and interval == 1.0  # an int counts batches
        if getattr(trainer, "check_val_every_n_epoch", 1) is not None and once:
            return
        self._warn_once(
            "within-epochs",
            "LabelWatch: this Trainer may validate several times per epoch"
            f" (val_check_interval={interval!r}). Each validation is scored, logged to W&B"
            " and counted in the averaging window and flag streaks, but the local folder"
            " epoch=<n> keeps only the epoch's last one.",
        )

    def _warn_if_epochs_rarely_line_up(self, trainer: Any) -> None:
        every = getattr(trainer, "check_val_every_n_epoch", 1)
        if not isinstance(every, int):
            return
        both = math.lcm(every, self.every_n_epochs)
        if both in (every, self.every_n_epochs):  # one divides the other: as asked
            return
        self._warn_once(
            "rarely-line-up",
            f"LabelWatch: the Trainer validates every {every} epochs"
            f" (check_val_every_n_epoch) and LabelWatch scores every {self.every_n_epochs}"
            f" (every_n_epochs), so only one validation every {both} epochs is scored. Use"
            f" every_n_epochs={every} or a multiple of it.",
        )

    def _warn_if_media_go_astray(self, sink: WandbSink) -> None:
        try:
            media_dir = sink.stray_media_dir()
        except Exception:  # only a check: never let it stop the fit
            log.debug("LabelWatch: could not compare W&B folders", exc_info=True)
            return
        if media_dir is not None:
            save_dir = sink.logger.save_dir
            self._warn_once(
                "stray-media",
                f"LabelWatch: W&B writes this run's media, the LabelWatch tables included, to"
                f" {media_dir}, not to the run's folder under the WandbLogger's save_dir"
                f" ({save_dir}): ddp_spawn re-attaches the run in a new process that does not"
                f" know its folder. Set WANDB_DIR={save_dir} before fit, or use"
                " strategy='ddp', to keep the tables with the run.",
            )

    def _start_afresh(self) -> None:
        """Forget the last fit's outputs, per-sample state and warnings. A resumed fit gets
        its output folder and epoch back from the checkpoint (load_state_dict comes after
        setup)."""
        self.last_epoch = self.last_run = self._resumed_after = None
        self.output_root = None
        self.last_output_dir = None
        for state in (
            self._previous_maps,
            self._previous_epochs,
            self._last_results,
            self._scorers,
            self._id_kinds,
            self._warned,  # a new fit warns again about what still holds for it
        ):
            state.clear()

    def _skips_epoch(self, trainer: Any) -> bool:
        """Not an ``every_n_epochs``-th training epoch, nor the fit's last validation, as far
        as the Trainer knows it now: ``max_epochs``, ``max_steps``, or a stop already asked
        for. A stop that this validation itself causes (early stopping) is warned about at
        the end of fit."""
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs:
            return False
        max_steps = getattr(trainer, "max_steps", -1)
        last_step = max_steps is not None and 0 <= max_steps <= trainer.global_step
        return not (last_step or getattr(trainer, "should_stop", False))

    def _watched_dataloaders(self, trainer: Any) -> dict[int, str | None]:
        """Index -> name of each watched validation dataloader (None when there is one)."""
        count = len(trainer.num_val_batches)
        loaders = trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            names: list[str | None] = [str(k) for k in loaders]
        elif count > 1:
            names = [f"dataloader_{i}" for i in range(count)]
        else:
            names = [None] * count
        wanted = self.dataloaders
        if wanted is not None:
            unknown = [w for w in wanted if w not in names and w not in range(count)]
            if unknown:
                raise ValueError(
                    f"`dataloaders`={wanted} names unknown validation dataloaders {unknown};"
                    f" there are {count}: indices {list(range(count))}, names {names}."
                )
        return {
            i: name
            for i, name in enumerate(names)
            if wanted is None or i in wanted or name in wanted
        }

    def _targets(self, out: Mapping[str, Any], batch: Any) -> torch.Tensor:
        if self.target_key in out:
            return out[self.target_key]
        if isinstance(batch, Mapping) and self.target_key in batch:
            return batch[self.target_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        found = f" (the batch's keys: {list(batch)})" if isinstance(batch, Mapping) else ""
        raise ValueError(
            f"LabelWatch found no targets: return {self.target_key!r} from validation_step,"
            f" use batches that are dicts with {self.target_key!r} or (input, target) tuples,"
            f" or name your key with `target_key` (e.g. LabelWatch(target_key='labels')){found}."
        )

    def _sample_ids(self, out: Mapping[str, Any], batch: Any, world_size: int) -> Any:
        if self.sample_id_key in out:
            return out[self.sample_id_key]
        if isinstance(batch, Mapping) and self.sample_id_key in batch:
            return batch[self.sample_id_key]
        if world_size > 1:
            raise ValueError(
                f"LabelWatch needs sample ids under DDP: put {self.sample_id_key!r} in the batch"
                " or in validation_step's output (ranks see shuffled, padded shards)."
            )
        return None  # running position

    def _check_not_shuffled(self, trainer: Any, dataloader_idx: int) -> None:
        """Running positions name samples only when every epoch walks them in one order."""
        loaders = trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        if isinstance(getattr(loader, "dataset", None), IterableDataset):
            return  # a stream has no sampler: its order is the dataset's own
        # What orders the samples: a batch sampler's own sampler when it has one (BatchSampler
        # and most custom ones), else the batch sampler itself, else the loader's sampler.
        batches = getattr(loader, "batch_sampler", None)
        order = getattr(batches, "sampler", None)
        order = order if order is not None else batches
        order = order if order is not None else getattr(loader, "sampler", None)
        random = isinstance(order, _RANDOM_ORDER)
        in_order = isinstance(order, SequentialSampler)
        if isinstance(order, DistributedSampler):  # Lightning's, even on one device
            random, in_order = bool(order.shuffle), not order.shuffle
        fix = (
            f"Put {self.sample_id_key!r} in the batch or in validation_step's output (the"
            " dataset index, say)"
        )
        if random:
            raise ValueError(
                f"LabelWatch: the validation dataloader draws samples in a random order"
                f" ({type(order).__name__}) and its batches carry no sample ids, so each epoch"
                " would give a sample another position (its row, history and streak would mix"
                f" samples). {fix}, or validate in order (shuffle=False)."
            )
        if order is not None and not in_order:
            self._warn_once(
                "positions",
                f"LabelWatch: the validation batches carry no sample ids, so a sample's id is"
                f" its position, but {type(order).__name__} may not walk the dataset in order"
                f" or in the same order every epoch. {fix}.",
            )

    def _check_captured(self, captured: CapturedEpoch | None) -> None:
        """The sanity check's rows pass scoring's input checks (labels, class names, ids),
        so a mistake shows before training rather than after the first epoch. Nothing is
        scored or kept (every rank runs this, on its own batches)."""
        if captured is not None:
            _, _, names, _, _ = check_predictions(
                captured.logits,
                captured.targets,
                class_names=self.class_names,
                sample_ids=captured.sample_ids,
                ignore_index=self.ignore_index,
            )
            watched_indices(self.watch_classes, names)

    def _metadata(self, batch: Any) -> dict[str, Any]:
        if not self.metadata_keys:
            return {}
        if not isinstance(batch, Mapping) or not all(k in batch for k in self.metadata_keys):
            raise ValueError(
                f"`metadata_keys`={list(self.metadata_keys)} must all be keys of the validation"
                " batch (a dict); found "
                f"{list(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
            )
        return {key: batch[key] for key in self.metadata_keys}

    def _remove_taps(self) -> None:
        for tap in (self._logits_tap, self._embedding_tap):
            if tap is not None:
                tap.remove()
        self._logits_tap = self._embedding_tap = None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _run_epoch_end(
        self, trainer: Any, captured: CapturedEpoch | None, name: str | None, run: int
    ) -> None:
        epoch = trainer.current_epoch
        host = captured.to_host() if captured is not None else None
        device_embeddings = captured.embeddings if captured is not None else None
        if self.output_root is None:  # before scoring, which reads a resumed fit's files
            self.output_root = self._output_root(trainer)
            if self.last_epoch is None:  # a new fit, not a resumed one
                self.output_root = self._unused(self.output_root, self._watched.values())
        samples = None
        if host is not None:
            samples = self._score(host, epoch, name, device_embeddings, run=run)
        if host is None or samples is None or len(samples) == 0:
            self._warn_once(
                f"empty-{name}",
                f"LabelWatch: validation epoch {epoch} had no samples to score (none captured,"
                " or all ignored or non-finite); nothing logged.",
            )
            return
        candidates = select_candidates(
            samples,
            self.max_candidates,
            flag_column="is_candidate",
            keep_column="is_watch_candidate",
        )
        summary = self._summary(samples, candidates, host, epoch, trainer.global_step)
        summary["dataloader"] = name
        summary.update(self._wandb_run_ids())
        root = self._dataloader_root(name)
        if self._resumed_after is not None:  # once: the epochs after it are then this fit's
            for watched in self._watched.values():
                self._set_aside_later_epochs(self._dataloader_root(watched), self._resumed_after)
            self._resumed_after = None
        pending = _PendingEpoch(epoch, trainer.global_step, name, samples, candidates, summary)
        pending.out_dir = root / f"epoch={epoch}"
        self._last_results[name] = (epoch, len(candidates), len(samples), pending.out_dir)
        pending.rows = self._subsample(samples, candidates)
        job = None if self._map_off else self._map_job(samples, pending.rows, host, name, epoch)
        if job is None or self._worker is None:  # no map, or a synchronous one: one write
            result = self._map_or_warn(lambda: compute_map(job), epoch) if job else None
            self._finish_epoch(pending, result)
            self._save_history(name, pending.out_dir)
            return
        # Scores are on disk at once; the map (and W&B, which shows it) follows when ready.
        self._write_local(pending)
        self._save_history(name, pending.out_dir)
        try:
            pending.map = self._worker.submit(job)
        except BrokenProcessPool as err:  # the worker died (killed for memory, say)
            self._lose_worker(err)
        self._pending.append(pending)
        self._drop_stale_maps()
        self._finish_maps(wait=False)

    def _wants_worker(self) -> bool:
        if not self.map_in_background or self.projection in ("none", "pca"):
            return False  # PCA takes milliseconds: not worth a process
        if callable(self.projection):
            try:
                pickle.dumps(self.projection)
            except Exception:
                self._warn_once(
                    "pickle",
                    "LabelWatch: the projection callable cannot be pickled, so maps run in the"
                    " training process; define it at module level to run it in the background.",
                )
                return False
        return True

    def _map_job(
        self,
        samples: pd.DataFrame,
        rows: np.ndarray,
        captured: CapturedEpoch,
        name: str | None,
        epoch: int,
    ) -> MapJob | None:
        """The rows to map (all, or a stratified subsample with every candidate), less those
        whose embedding has no direction (NaN, inf or all zero): no place to put them."""
        if captured.embeddings is None or self.projection == "none":
            return None
        ids = samples["sample_id"]
        positions = pd.Index(captured.sample_ids).get_indexer(ids.iloc[rows])
        embeddings = captured.embeddings[torch.from_numpy(positions)]
        directed = has_direction(embeddings)
        if not bool(directed.all()):
            rows, embeddings = rows[directed.numpy()], embeddings[directed]
            if len(rows) == 0:
                return None
        return MapJob(
            epoch=epoch,
            sample_ids=ids.iloc[rows].tolist(),
            embeddings=embeddings.float().numpy(),
            previous=self._previous_map(name),
            method=self.projection,
            seed=self.seed,
            stream=name,
            previous_epoch=self._previous_epochs.get(name, -1),
        )

    def _previous_map(self, name: str | None) -> dict[Any, tuple[float, float]]:
        """The last map of this dataloader, from memory or, after a resume, from disk."""
        if name not in self._previous_maps:
            last = read_samples(self._last_epoch_dir(name), ["sample_id", "epoch", "x", "y"])
            if last is not None and last["x"].notna().any():
                last = last.dropna(subset=["x", "y"])
                xy = zip(last["x"], last["y"], strict=True)
                self._previous_maps[name] = dict(zip(last["sample_id"], xy, strict=True))
                self._previous_epochs[name] = int(last["epoch"].iloc[0])
        return self._previous_maps.get(name, {})

    def _last_epoch_dir(self, name: str | None) -> Path | None:
        """The folder of the newest epoch before now (what a resumed run continues)."""
        if self.output_root is None or self.last_epoch is None:
            return None
        return self._dataloader_root(name) / f"epoch={self.last_epoch}"

    def _dataloader_root(self, name: str | None) -> Path:
        """The folder of a watched dataloader's epochs (the outputs' root for one)."""
        assert self.output_root is not None
        return self.output_root / name if name is not None else self.output_root

    def _map_or_warn(self, compute: Callable[[], MapResult], epoch: int) -> MapResult | None:
        try:
            return compute()
        except Exception as err:  # a failed map must not cost the scores
            log.debug("LabelWatch: map failed", exc_info=True)
            self._warn_once(
                "map", f"LabelWatch could not map epoch {epoch} ({type(err).__name__}: {err})."
            )
            return None

    def _drop_stale_maps(self) -> None:
        """Bound the worker's backlog (its memory): a waiting map that a newer epoch of its
        dataloader overtakes is cancelled, unless the pool has handed it to the process
        already (it queues up to two there). Its epoch stays in line and is logged without
        coordinates, after the epochs before it (it is never lost)."""
        queued = list(self._pending)
        for at, stale in enumerate(queued[1:], start=2):
            if not any(newer.name == stale.name for newer in queued[at:]):
                continue  # the newest of its dataloader: not overtaken
            if stale.map is None or not stale.map.cancel():
                continue  # cancelled already, or running
            stale.map = None
            self._warn_once(
                "behind",
                "LabelWatch: maps are slower than validation epochs; some epochs are logged"
                " without coordinates (lower `max_points`, or map every few epochs).",
            )

    def _finish_maps(self, wait: bool, give_up: bool = False) -> None:
        """Log every epoch whose map has landed (or was cancelled), in order (all of them
        when `wait`)."""
        given_up = []
        while self._pending:
            pending = self._pending[0]
            future = pending.map
            if give_up and future is not None and not future.done():
                future.cancel()
                result = None
                given_up.append(pending.epoch)
            elif wait or future is None or future.done():
                if wait and future is not None and not self._map_lands(future, pending.epoch):
                    future = None  # the worker was stuck, and is stopped
                result = self._map_or_warn(future.result, pending.epoch) if future else None
            else:
                return
            self._pending.popleft()
            self._finish_epoch(pending, result)
        if given_up:
            rank_zero_info(
                f"LabelWatch: the fit stopped with the maps of epoch(s) {given_up} unfinished;"
                " those epochs are written and logged without coordinates."
            )

    def _map_lands(self, future: Future, epoch: int) -> bool:
        """Wait for a map, within the worker's patience. A worker that does not answer in
        it (deadlocked, or stopped) is stopped, and the epochs still mapping are logged
        without coordinates: fit returns."""
        patience = self._worker.patience() if self._worker is not None else None
        if patience is None or wait([future], timeout=patience).done:
            return True
        self._warn_once(
            "worker-stuck",
            f"LabelWatch: the map worker did not finish epoch {epoch}'s map in"
            f" {patience:.0f} s; it is stopped, and the epochs still mapping"
            " are written and logged without coordinates.",
        )
        for pending in self._pending:
            pending.map = None
        self._stop_worker()
        self._map_off = True
        return False

    def _finish_epoch(self, pending: _PendingEpoch, result: MapResult | None) -> None:
        """Merge the map into the epoch's rows, rewrite the local files, then log to W&B."""
        samples, candidates, summary = pending.samples, pending.candidates, pending.summary
        was_pending = summary["projection"] == "pending"
        summary["projection"] = result.method if result is not None else "none"
        if result is not None:
            coords = pd.DataFrame(
                {"x": result.coords[:, 0], "y": result.coords[:, 1]},
                index=pd.Index(result.sample_ids),
            )
            previous = self._previous_maps.get(pending.name, {})
            for frame in (samples, candidates):
                at = coords.reindex(frame["sample_id"])
                frame["x"], frame["y"] = at["x"].to_numpy(), at["y"].to_numpy()
                before = pd.DataFrame.from_dict(previous, orient="index", columns=["x", "y"])
                before = before.reindex(frame["sample_id"])
                frame["moved"] = np.hypot(
                    frame["x"].to_numpy(float) - before["x"].to_numpy(float),
                    frame["y"].to_numpy(float) - before["y"].to_numpy(float),
                )
            self._previous_maps[pending.name] = dict(
                zip(result.sample_ids, map(tuple, result.coords.tolist()), strict=True)
            )
            self._previous_epochs[pending.name] = pending.epoch
            summary["map_points"] = len(result.sample_ids)
            summary["map_warm_started"] = result.warm_started
            summary["median_moved"] = (
                float(np.nanmedian(samples["moved"])) if samples["moved"].notna().any() else None
            )
        if pending.out_dir is not None and not pending.written:
            self._write_local(pending)
        elif pending.out_dir is not None and was_pending:
            # The scores are on disk already; adding the coordinates (a rewrite, seconds at
            # 100k rows) is left to the logging thread, ahead of this epoch's W&B logging.
            self._in_logging_thread(self._write_local, pending)
        if self._wandb is not None:  # also when the local files failed: W&B may not
            # The rows mapped (every candidate among them), and those the map left off:
            # building a W&B table costs ~0.1 ms a row, so it stays within max_points.
            rows = pending.rows
            if rows is not None and len(rows) < len(samples):
                samples = samples.iloc[rows]
            self._in_logging_thread(
                self._log_wandb,
                pending.epoch,
                pending.step,
                pending.name,
                samples,
                candidates,
                summary,
                pending.out_dir,
            )

    def _subsample(self, samples: pd.DataFrame, candidates: pd.DataFrame) -> np.ndarray:
        """Rows to map and log above `max_points`: every candidate, then per class the
        samples whose id ranks first, the same ones every epoch, so maps warm-start."""
        if len(samples) <= self.max_points:
            return np.arange(len(samples))
        must = pd.Index(samples["sample_id"]).get_indexer(candidates["sample_id"])
        priority = id_priority(samples["sample_id"], seed=self.seed)
        labels = samples["given_label"].to_numpy()
        return stratified_subsample(labels, must, self.max_points, priority=priority)

    def _score(
        self,
        captured: CapturedEpoch,
        epoch: int,
        name: str | None,
        device_embeddings: torch.Tensor | None = None,
        *,
        run: int,
    ) -> pd.DataFrame:
        """Scores of the host copy ``captured`` (:class:`EpochScorer`); ``run`` is the
        validation run's step in the epoch history."""
        kind = _id_kind(captured.sample_ids)
        was, self._id_kinds[name] = self._id_kinds.get(name), kind
        fresh = was is not None and kind != was
        if fresh:  # no id matches: start afresh, rather than keep both kinds for good
            self._warn_once(
                f"id-kind-{name}",
                f"LabelWatch: the sample ids changed from {was} to {kind} since the last"
                " validation, so no sample is recognised: the averaging window, flag streaks,"
                " first watch scores and the map's alignment start again. Keep ids stable.",
            )
            self._previous_maps[name] = {}
        return self._scorer(name, fresh).score(captured, epoch, device_embeddings, run=run)

    def _scorer(self, name: str | None, fresh: bool = False) -> EpochScorer:
        """This dataloader's scorer; a resumed fit's reads what its samples carry over
        from the last epoch's files (unless ``fresh``)."""
        scorer = self._scorers.get(name)
        if scorer is None or fresh:
            options = ScoringOptions(
                class_names=self.class_names,
                label_quality=self.label_quality,
                candidate_rule=self.candidate_rule,
                history_window=self.history_window,
                history_dtype=_HISTORY_DTYPES[self.history_dtype],
                history_top_k=self.history_top_k,
                knn_weight=self.knn_weight,
                min_knn_agreement=self.min_knn_agreement,
                watch_classes=self.watch_classes,
                min_watch_score=self.min_watch_score,
                ignore_index=self.ignore_index,
                seed=self.seed,
                embeddings_dtype=self.embeddings_dtype,
            )
            scorer = EpochScorer(
                options,
                self._warn_once,
                last_dir=None if fresh else self._last_epoch_dir(name),
                last_run=self.last_run,
                last_epoch=self.last_epoch,
            )
            self._scorers[name] = scorer
        return scorer

    def _save_history(self, name: str | None, out_dir: Path | None) -> None:
        """Hand the history to the saving thread, off the training path."""
        scorer = self._scorers.get(name)
        if out_dir is None or scorer is None:
            return
        if self._history_saver is None:
            self._history_saver = ThreadPoolExecutor(1, thread_name_prefix="labelwatch-history")
        scorer.save_history(out_dir, self._history_saver)

    def _summary(
        self,
        samples: pd.DataFrame,
        candidates: pd.DataFrame,
        captured: CapturedEpoch,
        epoch: int,
        step: int,
    ) -> dict[str, Any]:
        scored = max(len(samples), 1)
        names = samples.attrs["class_names"]
        return {
            "epoch": epoch,
            "global_step": step,
            "num_captured": len(captured),
            "num_samples": len(samples),
            "num_ignored": samples.attrs["num_ignored"],
            "num_nonfinite": samples.attrs["num_nonfinite"],
            # kept, without neighbours, watch scores or a place on the map
            "num_nonfinite_embeddings": samples.attrs.get("num_nonfinite_embeddings", 0),
            "num_zero_embeddings": samples.attrs.get("num_zero_embeddings", 0),
            "num_mismatches": int(samples["is_mismatch"].sum()),
            "mismatch_rate": float(samples["is_mismatch"].sum() / scored),
            "num_confident_mismatches": int(samples["is_confident_mismatch"].sum()),
            "confident_mismatch_rate": float(samples["is_confident_mismatch"].sum() / scored),
            "num_candidates": len(candidates),
            "mean_entropy": float(samples["entropy"].mean()) if len(samples) else float("nan"),
            "class_names": list(names),
            # null for a class no sample is labelled with: it has no mean to be confident at
            "thresholds": {
                name: (t if t <= 1.0 else None)
                for name, t in zip(names, samples.attrs["thresholds"], strict=True)
            },
            "num_flagged": int(samples["is_candidate"].sum()),
            "label_quality": effective_label_quality(
                self.label_quality, bool(samples["knn_agreement"].notna().any())
            ),
            "candidate_rule": self.candidate_rule,
            "history_window": self.history_window,
            "knn_weight": self.knn_weight,
            "min_knn_agreement": self.min_knn_agreement,
            **self._watch_summary(samples),
            "projection": (
                "pending"
                if captured.embeddings is not None and self.projection != "none"
                else "none"
            ),
        }

    def _watch_summary(self, samples: pd.DataFrame) -> dict[str, Any]:
        if not self.watch_classes:
            return {}
        names = samples.attrs["class_names"]
        return {
            "watch_classes": [names[i] for i in watched_indices(self.watch_classes, names)],
            "min_watch_score": self.min_watch_score,
            "num_watch_flagged": int(samples["is_watch_candidate"].sum()),
        }

    def _wandb_run_ids(self) -> dict[str, str]:
        """The W&B run this epoch is logged to, kept in summary.json: a resumed fit may log to
        a new run while its local files stay in the first run's folder."""
        if self._wandb is None:
            return {}
        try:
            run = self._wandb.run
            return {"wandb_run_id": str(run.id), "wandb_project": str(run.project)}
        except Exception:  # a W&B failure is warned about where the epoch is logged
            return {}

    def _write_local(self, pending: _PendingEpoch) -> None:
        """(Re)write the epoch's files; ``out_dir`` becomes None when none could be written
        (a failed rewrite keeps the first, complete files)."""
        assert pending.out_dir is not None
        try:
            LocalSink(pending.out_dir.parent).write(
                pending.epoch, pending.samples, pending.candidates, pending.summary
            )
        except Exception as err:  # a full disk, or a value pyarrow cannot store
            log.debug("LabelWatch: local write failed", exc_info=True)
            rank_zero_warn(
                f"LabelWatch could not write its local outputs to {pending.out_dir}"
                f" ({type(err).__name__}: {err})"
            )
            if not pending.written:
                with contextlib.suppress(OSError):
                    pending.out_dir.rmdir()  # the folder it made, if nothing is in it
                pending.out_dir = None
            return
        pending.written = True
        self.last_output_dir = pending.out_dir

    def _set_aside_later_epochs(self, root: Path, after: int) -> None:
        """On a resume from an older checkpoint, the epochs that the first fit wrote after
        it belong to a run that does not continue, and readers would take the newest of
        them for the latest: they are renamed to ``abandoned-epoch=<n>``."""
        later = []
        for folder in root.glob("epoch=*"):
            number = folder.name.split("=", 1)[1]
            if number.isdigit() and int(number) > after:
                later.append(int(number))
                target, copies = folder.with_name(f"abandoned-{folder.name}"), 1
                while target.exists():  # abandoned before, by another resume
                    copies += 1
                    target = folder.with_name(f"abandoned{copies}-{folder.name}")
                try:
                    folder.rename(target)
                except OSError as err:
                    rank_zero_warn(f"LabelWatch could not rename {folder} to {target}: {err}")
        if later:
            self._warn_once(
                f"abandoned-{root}",
                f"LabelWatch: this fit resumes after epoch {after}, and {root} holds epochs"
                f" {sorted(later)} of the fit that went on from there; they are renamed"
                " abandoned-epoch=<n>, so that readers take this fit's epochs for the latest.",
            )

    def _unused(self, root: Path, names: Iterable[str | None]) -> Path:
        """``root``, or ``root-v1``, ``root-v2``, ... when the folders of the dataloaders
        ``names`` there hold another fit's epochs, which the new ones would overwrite in
        part and which readers would take for the latest (as ModelCheckpoint versions a
        file it would overwrite)."""
        names = list(names)

        def taken(folder: Path) -> bool:
            return any(any((folder / (n or "")).glob("epoch=*")) for n in names)

        chosen, version = root, 0
        while taken(chosen):
            version += 1
            chosen = root.with_name(f"{root.name}-v{version}")
        if chosen != root:
            rank_zero_warn(
                f"LabelWatch: {root} holds the epochs of another fit; this fit writes to"
                f" {chosen} (resume from a checkpoint to continue that fit)."
            )
        return chosen

    def _output_root(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        base, parts = trainer.default_root_dir, ("labelwatch",)
        if trainer.loggers:
            logger = trainer.loggers[0]
            base = logger.save_dir or trainer.default_root_dir
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            parts = (str(logger.name), version, "labelwatch")
        if "://" in str(base):  # s3://, gs://: Lightning writes there through fsspec
            local = Path(*parts)
            self._warn_once(
                "remote-root",
                f"LabelWatch writes local files, and the Trainer's folder {base} is remote:"
                f" its outputs go to {local.absolute()} instead (LabelWatch(dirpath=...)"
                " chooses another).",
            )
            return local
        return Path(base, *parts)

    def _in_logging_thread(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` on the logging thread, after what was handed to it before;
        the frames passed are not changed after this. An error there is a warning."""
        if self._logging is None:
            self._logging = ThreadPoolExecutor(1, thread_name_prefix="labelwatch-logging")
        self._last_logged = self._logging.submit(self._warn_on_error, function, *args)

    @staticmethod
    def _warn_on_error(function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception as err:  # on the logging thread: nothing must escape unseen
            log.debug("LabelWatch: background %s failed", function.__name__, exc_info=True)
            rank_zero_warn(f"LabelWatch: {function.__name__} failed ({type(err).__name__}: {err})")

    def _log_wandb(
        self,
        epoch: int,
        step: int,
        name: str | None,
        samples: pd.DataFrame,
        candidates: pd.DataFrame,
        summary: dict[str, Any],
        out_dir: Path | None,
    ) -> None:
        assert self._wandb is not None
        # W&B tables stay bounded even when an untrained model flags most samples: the
        # top-ranked max_points candidates (the artifact's parquet and CSV hold them all).
        candidates = candidates.head(self.max_points)
        files = None
        if out_dir is not None:
            files = {f: out_dir / f for f in ("candidates.parquet", "candidates.csv")}
        else:  # the artifact holds the local files: none to hold
            self._warn_once(
                "wandb-no-artifact",
                f"LabelWatch: the local files of epoch {epoch} could not be written, so W&B"
                " gets its tables and metrics but no relabel-candidates artifact version.",
            )
        try:
            self._wandb.log_epoch(
                epoch=epoch,
                step=step,
                dataloader=name,
                samples=samples,
                candidates=candidates,
                summary=summary,
                files=files,
                media=None if self._media_off else self._media(samples, candidates),
            )
        except Exception as err:  # W&B must never stop training; the local copy is kept
            log.debug("LabelWatch: W&B logging failed", exc_info=True)
            self._warn_once(
                "wandb",
                f"LabelWatch could not log to W&B ({type(err).__name__}: {err}); training goes on"
                f" and the results are kept locally in {self.output_root}.",
            )

    def _one_medium(self, row: dict[str, Any]) -> Any:
        """``media_fn(row)``; a _MediaFailure when it raises or gives something that is not
        W&B media: one bad file must not cost the epoch's tables."""
        try:
            medium = self.media_fn(row)
        except Exception as err:
            return _MediaFailure(f"{type(err).__name__}: {err}")
        if medium is not None and not _is_wandb_value(medium):
            return _MediaFailure(
                f"it returned a {type(medium).__name__}, not W&B media such as"
                " wandb.Audio(...) or wandb.Image(...)"
            )
        return medium

    def _media(self, samples: pd.DataFrame, candidates: pd.DataFrame) -> dict[Any, Any] | None:
        """Media for every candidate in the W&B ``samples`` table and up to
        `max_media_rows` of its other rows, keyed by id (media go only in that table)."""
        if self.media_fn is None:
            return None
        is_candidate = ids_in(pd.Index(samples["sample_id"]), pd.Index(candidates["sample_id"]))
        # The budget for other rows goes to those most likely wrong: the flagged rows that
        # max_candidates left out, then the lowest label_quality.
        others = samples[~is_candidate].sort_values(
            ["is_candidate", "label_quality"], ascending=[False, True], kind="stable"
        )
        rows = pd.concat([samples[is_candidate], others.head(self.max_media_rows)])
        records = rows.to_dict("records")
        media: dict[Any, Any] = {}
        failures: dict[Any, _MediaFailure] = {}
        for row in records:
            medium = self._one_medium(row)
            if isinstance(medium, _MediaFailure):
                failures[row["sample_id"]], medium = medium, None
            media[row["sample_id"]] = medium
        if failures:
            sample_id, failure = next(iter(failures.items()))
            self._warn_once(
                "media-failed",
                f"LabelWatch: media_fn failed for {len(failures)} of {len(media)} rows (the"
                f" first: sample {sample_id!r}, {failure}); they have no media in the W&B"
                " table, everything else is logged.",
            )
        missing = [
            r for r in records if media[r["sample_id"]] is None and r["sample_id"] not in failures
        ]
        # None from a media_fn of the user's may be deliberate; from ours it is a missing file.
        if missing and (isinstance(self.media_fn, _FromPath) or len(missing) == len(records)):
            key = getattr(self.media_fn, "key", None)
            key = key if key in rows.columns else next(iter(self.metadata_keys), None)
            first = f" (the first: {key}={missing[0][key]!r})" if key in rows.columns else ""
            root = getattr(self.media_fn, "root", None)
            self._warn_once(
                "no-media",
                f"LabelWatch: media_fn gave no media for {len(missing)} of the {len(media)}"
                f" rows it was asked for{first}; check that metadata_keys holds the file paths"
                + (f" and that they are under root={str(root)!r}." if root is not None else "."),
            )
        return media


class LabelWatch(LabelWatchLogic, Callback):
    r"""Find likely label errors in the validation set, every validation epoch.

    Captures each validation sample's logits, target, id and (optionally) embedding,
    scores the given label against the model's prediction, maps the embeddings to 2-D,
    and writes a per-sample table and ranked relabel candidates: always to local files
    (``<log dir>/labelwatch/epoch=<n>/``), and to W&B when the Trainer has a
    ``WandbLogger`` (a table per epoch plus a ``relabel-candidates`` artifact).

    What is read from each validation batch (first match wins):

    - logits: ``outputs[logits_key]`` from ``validation_step``, else the output of the
      submodule ``logits_layer``;
    - embeddings (optional): ``outputs[embeddings_key]``, else the output of
      ``embedding_layer``, flattened to ``(batch, D)`` with the same ``D`` in every
      batch (a numpy array, and integer embeddings as float32); without them no map;
    - targets: ``outputs[target_key]``, else ``batch[target_key]``, else ``batch[1]``;
    - sample ids: ``outputs[sample_id_key]``, else ``batch[sample_id_key]``, else the
      running position (valid only in one process with an unshuffled loader); integers
      or strings, others (floats, tuples, bytes) are refused in the batch that has them.

    After ``fit``, ``output_root``, ``last_output_dir`` (the newest epoch's folder) and
    ``last_epoch`` say where the outputs are, in the process that scored them: rank zero.
    Under ``ddp_spawn`` that is a spawned copy of the callback, so in the launching
    process they stay None: read the folder with ``labelwatch.load_candidates``.

    Args:
        class_names: one name per class, in output order; defaults to ``"0"``, ``"1"``, ...
        logits_key, embeddings_key, target_key, sample_id_key: keys looked up as above.
        logits_layer: dotted name of the submodule whose output is the logits, used
            when ``validation_step`` does not return them. A layer that runs more than
            once a step (test-time augmentation) gives its last output, with a warning.
        embedding_layer: dotted name of the submodule whose output is the embedding.
        metadata_keys: batch keys copied into every row (for example a file path): one
            number or string per sample. Paths are written as strings, and a key whose
            values mix kinds (or hold lists) as text, with a warning.
        dataloaders: which validation dataloaders to watch, by index or name (None = all).
            With several, each gets its own folder, W&B keys and artifact, by name. Two
            LabelWatch callbacks in one Trainer must watch different dataloaders (or have
            different ``table_key``): Lightning tells callbacks apart by their state key.
        every_n_epochs: score the validation of every n-th training epoch (epochs n - 1,
            2n - 1, ...; 1 = each one), and that of the last epoch when the Trainer knows it
            in advance (``max_epochs``, ``max_steps``, a stop already asked for); a fit that
            early stopping ends on a skipped epoch warns that its final model is unscored.
        projection: ``"umap"`` (PCA below 16 samples), ``"pca"``, ``"none"``, or a picklable
            callable ``f(embeddings, init) -> (N, 2)``. Maps are warm-started from the
            previous epoch by sample id; see :mod:`labelwatch.projection`. Rows whose
            embedding is NaN/inf or all zero are left off the map (a callable gets the
            others only).
        label_quality: ranking in [0, 1], lower = more likely mislabelled. Default
            ``"knn_mixed_margin"``: the margin ``(p_mix(given) - max p_mix(other) + 1) / 2``
            of ``p_mix = (1 - knn_weight) * averaged + knn_weight * knn``, where ``averaged``
            is the sample's probabilities averaged over its last ``history_window``
            validation epochs and ``knn`` the label distribution of its 10 nearest
            neighbours (cosine, embeddings). Also ``"knn_mixed_self_confidence"``,
            ``"averaged_margin"``, ``"averaged_self_confidence"``, ``"knn_agreement"``
            (see :func:`labelwatch.combined.combined_quality`, whose docstring has the
            measurements behind the default), and the single-epoch scores of cleanlab
            ``"self_confidence"``, ``"normalized_margin"``, ``"confidence_weighted_entropy"``
            (see :func:`labelwatch.score_predictions`). Without embeddings (or above 50k
            samples held on a CPU) the ``knn_*`` methods use ``averaged`` alone:
            ``"averaged_margin"`` (``"averaged_self_confidence"`` for
            ``"knn_mixed_self_confidence"``).
        candidate_rule: which rows become candidates (``is_candidate``). ``"combined"``
            (default): confident learning (per-class thresholds) on ``p_mix``, or
            ``knn_agreement < min_knn_agreement``; ``"confident_mismatch"``: this epoch's
            ``is_confident_mismatch`` alone (the single-epoch rule, equal to cleanlab's
            ``confident_learning`` filter).
        history_window: validation epochs averaged per sample (``>= 1``). The window costs
            ``(history_window - 1) x N x min(C, history_top_k)`` values (``x C`` with
            ``history_top_k=None``) in memory on rank zero and on disk (``history.arrow``
            beside the newest epoch's outputs, read back on resume; it is not in the
            checkpoint).
        knn_weight: weight of the neighbours' labels in ``p_mix``, in [0, 1].
        min_knn_agreement: in [0, 1]; with ``candidate_rule="combined"`` a sample with a
            smaller share of neighbours carrying its label is a candidate (0 turns it off);
            scaled down for a class too small to fill the neighbourhood
            (:func:`labelwatch.combined.reachable_agreement`).
        max_candidates: keep at most this many candidates per epoch, those with the lowest
            ``label_quality`` (None = every flagged row), plus every watched-class flag.
        watch_classes: classes to watch for where the label leaves them out (names or
            indices; a siren behind a dog bark labelled ``dog_bark``). Each adds a column
            ``watch_<class>``: how far the sample's embedding leans toward that class (along
            what sets it apart from the sample's own label), as a robust z-score among the
            samples with that label (see :mod:`labelwatch.watch`), and
            ``first_watch_<class>``, its score in the first validation that scored it,
            before the model learned to overlook the class. Needs embeddings; a watched
            class that no validation sample is labelled with scores NaN everywhere (warned).
        min_watch_score: a sample with a watch score at least this, now or in its first
            validation, is a candidate (``is_watch_candidate``), suggested as that class
            unless the candidate rule flags it anyway.
        ignore_index: target value of unlabelled samples; skipped and counted.
        dirpath: local output folder; defaults to ``<save_dir>/<name>/<version>/labelwatch``
            of the first logger (like ``ModelCheckpoint``), or ``<default_root_dir>/labelwatch``.
            A URL is refused; when the Trainer's folder is remote (``s3://``), the default is
            ``./<name>/<version>/labelwatch`` (``./labelwatch`` without a logger), with a
            warning.
        table_key: W&B key of the per-sample table; candidates go to ``<prefix>/candidates``.
        media_fn: maps a row (a dict with ``sample_id``, the metadata keys and the scores)
            to a ``wandb.Audio`` / ``wandb.Image`` (or None); logged for every candidate
            and for up to ``max_media_rows`` other rows.
        max_media_rows: cap on media for rows that are not candidates.
        embeddings_dtype: ``"float16"`` stores embeddings at half the memory. Values beyond
            +-65504 overflow to inf there: such rows lose their neighbours, watch scores and
            map point (counted in ``summary.json`` as ``num_nonfinite_embeddings``, warned).
        logits_dtype: ``"float16"`` stores the captured logits at half the memory; every
            score is still computed in float32 from them (the probabilities move by about
            1e-3: rankings barely change). Logits beyond +-65504 are not finite in
            float16 and their rows are left out of scoring.
        history_dtype: ``"float16"`` stores the epoch history's probabilities at half the
            memory and disk (about 3 significant digits: rankings do not change measurably).
        history_top_k: the epoch history keeps each past epoch's ``history_top_k`` most
            probable classes per sample and spreads the rest of the probability evenly over
            the others (exact while C <= ``history_top_k``; None keeps whole vectors). At
            C = 1000 the default keeps 1/48 of the memory (see :mod:`labelwatch.history`).
        offload_to_cpu: copy each batch to (pinned) host memory as it arrives.
        max_points: map and log to W&B at most this many rows: a class-stratified
            subsample that includes every candidate (the local files keep every row).
        map_in_background: compute UMAP maps in a worker process (True), so training does
            not wait; False computes them in the training process. At fit end a map that
            takes over 5 minutes (or ten times the slowest so far) stops the worker, and the
            epochs still mapping are logged without coordinates.
        seed: seed of the 2-D map.

    Raises:
        ValueError: for an argument outside its allowed values (named in the message).

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import WandbLogger
        from labelwatch import LabelWatch

        trainer = Trainer(
            logger=WandbLogger(project="sounds", offline=True),
            callbacks=[LabelWatch(class_names=["dog_bark", "siren"], embedding_layer="backbone")],
        )
    """


# Samplers whose order changes from epoch to epoch: positions cannot name samples.
_RANDOM_ORDER = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


class _MediaFailure(str):
    """Why ``media_fn`` gave no media for a row."""


def _is_wandb_value(value: Any) -> bool:
    from wandb.sdk.data_types.base_types.wb_value import WBValue

    return isinstance(value, WBValue)


def _check_int(argument: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    """An integer (not a bool) >= ``minimum``; None too when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        raise ValueError(f"`{argument}` must be {kind} >= {minimum}, got {value!r}")


def _name_list(argument: str, value: Any, *, example: str) -> list[Any] | None:
    """``value`` as a list; a bare string or number (a common slip) is an error."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, int)) or not isinstance(value, Iterable):
        raise ValueError(f"`{argument}` must be a list, e.g. {argument}={example}; got {value!r}")
    return list(value)
