"""Local outputs, written for every epoch whether or not W&B is there.

Layout: ``<dirpath>/epoch=<n>/`` holding ``samples.parquet``, ``candidates.parquet``,
``candidates.csv`` and ``summary.json``. Each file is written to a temporary name and
renamed into place, so a file is either complete or absent.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from labelwatch.candidates import save_csv, to_csv_safe

__all__ = ["LocalSink", "epoch_dir", "read_samples", "write_atomic", "write_parquet"]

# Rows converted to Arrow at a time: the Arrow copy of a frame is never whole in memory.
ROWS_PER_GROUP = 65_536


def epoch_dir(root: str | Path, epoch: int) -> Path:
    return Path(root) / f"epoch={epoch}"


class LocalSink:
    """Writes one epoch's samples, candidates and summary under ``dirpath``."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def write(
        self, epoch: int, samples: pd.DataFrame, candidates: pd.DataFrame, summary: dict[str, Any]
    ) -> Path:
        out = epoch_dir(self.dirpath, epoch)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "samples.parquet", lambda p: write_parquet(samples, p))
        write_atomic(out / "candidates.parquet", lambda p: write_parquet(candidates, p))
        write_atomic(out / "candidates.csv", lambda p: save_csv(to_csv_safe(candidates), p))
        text = json.dumps(summary, indent=2, default=_json_default)
        write_atomic(out / "summary.json", lambda p: Path(p).write_text(text + "\n"))
        return out


def read_samples(
    folder: Path | None, columns: list[str], require_all: bool = True
) -> pd.DataFrame | None:
    """``columns`` of the samples.parquet that :class:`LocalSink` wrote in ``folder`` (the
    last epoch's, which a resumed fit continues); None when there is no folder, when the
    file lacks a column (an older file: what reads it starts afresh; with ``require_all``
    False, only when it lacks the first column, and the others it has are read), and,
    with a warning, when it is missing or unreadable."""
    if folder is None:
        return None
    import pyarrow.parquet as pq

    path = (folder / "samples.parquet").absolute()  # a relative one may read as a URI
    try:
        present = set(pq.read_schema(path).names)
        if not require_all:
            columns = [c for c in columns if c in present]
        if not columns or not set(columns) <= present or columns[0] not in present:
            return None
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError) as err:  # missing, truncated, not parquet
        warnings.warn(  # from one line: shown once for the three readers of a resume
            f"LabelWatch could not read {path} ({type(err).__name__}): what samples carry"
            " from epoch to epoch there (flag streaks, first watch scores, the map's"
            " alignment) starts again from this epoch.",
            stacklevel=1,
        )
        return None


def write_parquet(frame: pd.DataFrame, path: str, rows_per_group: int = ROWS_PER_GROUP) -> None:
    """``frame.to_parquet(path, index=False)`` (same schema, pandas metadata and attrs),
    converted to Arrow one row group at a time: at 100k rows a whole-frame Arrow copy is
    the largest allocation of an epoch end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    if frame.attrs:  # as pandas writes them, so read_parquet restores them
        schema = schema.with_metadata({**schema.metadata, b"PANDAS_ATTRS": json.dumps(frame.attrs)})
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, max(len(frame), 1), rows_per_group):
            chunk = frame.iloc[start : start + rows_per_group]
            writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path`` in one step.
    ``tmp_path`` is absolute: pyarrow reads a relative path whose first folder holds a
    colon (``lr:0.1/...``) as a URI."""
    tmp = os.path.abspath(_new_temp_file(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp_file(path: Path) -> str:
    """An empty file beside ``path``, made with the permissions the umask gives new files
    (mkstemp's are 0600: colleagues could not read the outputs on a shared machine)."""
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to summary.json")
