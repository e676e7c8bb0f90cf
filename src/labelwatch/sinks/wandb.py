"""Weights & Biases output: reuses the run of the Trainer's WandbLogger, never a second one.

Per epoch: the per-sample table under one key (the dashboard's step slider walks the
epochs), the candidates table, summary metrics, and the artifact
``relabel-candidates-<run id>`` (type ``relabel-candidates``, aliases ``latest`` and
``epoch-<n>``) holding ``candidates.parquet``, ``candidates.csv`` and a W&B table.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ARTIFACT_TYPE", "WandbSink", "artifact_name", "find_wandb_logger"]

ARTIFACT_TYPE = "relabel-candidates"
SUMMARY_METRICS = ("num_candidates", "mismatch_rate", "confident_mismatch_rate", "mean_entropy")


def artifact_name(run_id: str, dataloader: str | None = None) -> str:
    """``relabel-candidates-<run id>``, or ``relabel-candidates-<dataloader>-<run id>``
    with each character of the dataloader's name that W&B refuses in artifact names (all
    but letters, digits, ``-``, ``_`` and ``.``) as ``_``."""
    if dataloader is not None:
        dataloader = re.sub(r"[^\w.-]", "_", dataloader, flags=re.ASCII)
    return "-".join(filter(None, (ARTIFACT_TYPE, dataloader, run_id)))


def find_wandb_logger(loggers: list[Any]) -> Any | None:
    """The first WandbLogger among the Trainer's loggers (either Lightning package)."""
    classes = []
    for module in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        try:
            classes.append(__import__(module, fromlist=["WandbLogger"]).WandbLogger)
        except ImportError:
            continue
    return next((lg for lg in loggers if isinstance(lg, tuple(classes))), None)


_PLAIN_TYPES = (int, bool, type(None))
_SHORT_STRING = 10_000  # W&B warns about longer values: let it see them
_UNCHANGED_BY_TO_LISTS = frozenset({int, bool, float, str, type(None)})
_patch_lock = threading.Lock()


class _JsonInOneGo:
    """The ``json`` module, except that ``dump`` encodes the whole object with the C
    encoder before writing: the same text as ``json.dump``, which streams through the
    pure-Python encoder at several times the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    @staticmethod
    def dump(obj: Any, fp: Any, **kwargs: Any) -> None:
        fp.write(json.dumps(obj, **kwargs))


@contextlib.contextmanager
def _plain_cells_as_they_are() -> Iterator[None]:
    """While logging, let plain cells skip W&B's per-cell work: the same files, less CPU.

    Logging a table costs CPU in the training process, under the GIL that training
    needs, in three passes over every cell (W&B 0.31):

    - the run's copy: ``_numpy_arrays_to_lists`` walks each row, looking for numpy
      arrays. A row of ``int``, ``bool``, ``float``, ``str`` and ``None`` comes back as
      it was, so such rows are kept as they are;
    - the copy in the table's ``run_table`` artifact: each cell goes through
      ``_json_helper``, about 5 us a cell. For ``int``, ``bool``, ``None``, short ``str``
      and non-NaN ``float``, the values our rows hold (:func:`_table`), it returns the
      value itself, so they are returned directly;
    - that copy is written with ``json.dump``, which here becomes :class:`_JsonInOneGo`.

    Anything else (media, NaN, numpy values) still goes through W&B. Where W&B's
    internals differ from these, nothing is changed.
    """
    try:
        from wandb.sdk.artifacts import artifact as artifact_module
        from wandb.sdk.data_types import table as table_module

        convert = table_module._json_helper
        to_lists = table_module._numpy_arrays_to_lists
        artifact_json = artifact_module.json
    except (ImportError, AttributeError):
        yield
        return

    def convert_unless_plain(value: Any, artifact: Any) -> Any:
        kind = type(value)
        if (
            kind in _PLAIN_TYPES
            or (kind is float and value == value)
            or (kind is str and len(value) < _SHORT_STRING)
        ):
            return value
        return convert(value, artifact)

    def to_lists_unless_plain(payload: Any) -> Any:
        if not isinstance(payload, dict) or type(payload.get("data")) is not list:
            return to_lists(payload)
        rows = [
            row
            if type(row) is list and all(type(v) in _UNCHANGED_BY_TO_LISTS for v in row)
            else to_lists(row)
            for row in payload["data"]
        ]
        return {key: rows if key == "data" else to_lists(v) for key, v in payload.items()}

    with _patch_lock:  # one logging thread at a time swaps them in and out
        table_module._json_helper = convert_unless_plain
        table_module._numpy_arrays_to_lists = to_lists_unless_plain
        artifact_module.json = _JsonInOneGo()
        try:
            yield
        finally:
            table_module._json_helper = convert
            table_module._numpy_arrays_to_lists = to_lists
            artifact_module.json = artifact_json


class WandbSink:
    """Logs one epoch's results into the run of a WandbLogger."""

    def __init__(self, logger: Any, *, table_key: str = "labelwatch/samples") -> None:
        self.logger = logger
        self.prefix, self.table_name = table_key.rsplit("/", 1)

    def keys(self, dataloader: str | None = None) -> tuple[str, str, str]:
        """(samples table key, candidates table key, metrics prefix) for one dataloader."""
        prefix = f"{self.prefix}/{dataloader}" if dataloader else self.prefix
        return f"{prefix}/{self.table_name}", f"{prefix}/candidates", prefix

    @property
    def run(self) -> Any:
        return self.logger.experiment

    def stray_media_dir(self) -> Path | None:
        """The folder W&B writes this run's media to, when it is outside the logger's
        ``save_dir`` (None otherwise). Under ddp_spawn the run is re-attached in a fresh
        process that no longer knows its folder: media go under ``./wandb`` while the
        run's record log stays under ``save_dir``."""
        save_dir = getattr(self.logger, "save_dir", None)
        media_dir = getattr(self.run, "dir", None)
        if not save_dir or not isinstance(media_dir, str) or getattr(self.run, "disabled", False):
            return None  # a disabled run writes nothing
        media_dir = Path(media_dir).resolve()
        return None if media_dir.is_relative_to(Path(save_dir).resolve()) else media_dir

    @_plain_cells_as_they_are()  # the same JSON, less CPU
    def log_epoch(
        self,
        *,
        epoch: int,
        step: int,
        dataloader: str | None = None,
        samples: pd.DataFrame,
        candidates: pd.DataFrame,
        summary: Mapping[str, Any],
        files: Mapping[str, Path] | None,
        media: Mapping[Any, Any] | None = None,
    ) -> None:
        """Log tables and metrics, then the artifact of ``files`` (none without them);
        ``media`` maps sample id -> W&B media."""
        import wandb

        run = self.run
        samples_key, candidates_key, prefix = self.keys(dataloader)
        metrics = {f"{prefix}/{k}": summary[k] for k in SUMMARY_METRICS}
        run.log(
            {
                # Media once, in the per-sample table (W&B copies media per table).
                samples_key: _table(samples, media),
                candidates_key: _table(candidates, None),
                **metrics,
                "epoch": epoch,
                "trainer/global_step": step,
            }
        )
        run.summary.update(metrics)
        if files is None:
            return
        artifact = wandb.Artifact(
            artifact_name(run.id, dataloader),
            type=ARTIFACT_TYPE,
            description="Validation samples whose given label the model or its neighbours dispute.",
            metadata={k: summary[k] for k in _ARTIFACT_METADATA if k in summary},
        )
        for name in ("candidates.parquet", "candidates.csv"):
            artifact.add_file(str(files[name]), name=name)
        artifact.add(_table(candidates, None), "candidates")
        run.log_artifact(artifact, aliases=["latest", f"epoch-{epoch}"])


_ARTIFACT_METADATA = (
    "epoch",
    "thresholds",
    "class_names",
    "num_samples",
    "num_candidates",
    "num_mismatches",
    "num_ignored",
    "num_nonfinite",
    "num_nonfinite_embeddings",
    "num_zero_embeddings",
    "label_quality",
    "candidate_rule",
    "num_flagged",
    "history_window",
    "watch_classes",  # these two only when classes are watched
    "num_watch_flagged",
    "dataloader",
)


def _table(frame: pd.DataFrame, media: Mapping[Any, Any] | None) -> Any:
    """A wandb.Table from plain Python rows (several times faster than from a DataFrame)."""
    import wandb

    names = list(frame.columns)
    columns = [_plain_column(column) for _, column in frame.items()]
    mixed = False
    if media is not None:
        names.append("media")
        columns.append([media.get(sample_id) for sample_id in frame["sample_id"].tolist()])
        # audio for some rows and images for others: W&B refuses the whole table otherwise
        mixed = len({type(m) for m in columns[-1] if m is not None}) > 1
    rows = [list(row) for row in zip(*columns, strict=True)]
    # wandb.Table infers column types cell by cell as each row is added: about 1 ms a row,
    # most of what logging costs. The types it would infer depend only on which Python
    # types each column holds, so it sees one row per (column, type) and gets the rest whole.
    examples = [rows[i] for i in _type_examples(columns)]
    table = wandb.Table(columns=names, data=examples, allow_mixed_types=mixed)
    table.data = rows
    return table


def _plain_column(column: pd.Series) -> list[Any]:
    """A column's values as Python objects (numpy scalars unwrapped), None where missing."""
    values = column.tolist()  # a numpy dtype gives Python scalars, whole
    if not isinstance(column.dtype, np.dtype) or column.dtype == object:
        values = [_plain(v) for v in values]
    missing = column.isna().to_numpy()
    if missing.any():
        values = [None if m else v for v, m in zip(values, missing, strict=True)]
    return values


def _type_examples(columns: list[list[Any]]) -> list[int]:
    """Row positions that hold, for every column, the first value of each Python type."""
    first = set()
    for values in columns:
        if len(set(map(type, values))) == 1:  # the usual case, at C speed
            first.add(0)
            continue
        seen: dict[type, int] = {}
        for position, value in enumerate(values):
            seen.setdefault(type(value), position)
        first.update(seen.values())
    return sorted(first)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
