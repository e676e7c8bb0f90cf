"""Local outputs, written for every epoch whether or not W&B is there.

Layout: ``<dirpath>/epoch=<n>/`` holding ``samples.parquet``, ``candidates.parquet``,
``candidates.csv`` and ``summary.json``. Each file is written to a temporary name and
renamed into place, so a file is either complete or absent.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from labelwatch.candidates import to_csv_safe

__all__ = ["LocalSink", "epoch_dir", "write_atomic"]


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
        write_atomic(out / "samples.parquet", lambda p: samples.to_parquet(p, index=False))
        write_atomic(out / "candidates.parquet", lambda p: candidates.to_parquet(p, index=False))
        write_atomic(
            out / "candidates.csv", lambda p: to_csv_safe(candidates).to_csv(p, index=False)
        )
        text = json.dumps(summary, indent=2, default=_json_default)
        write_atomic(out / "summary.json", lambda p: Path(p).write_text(text + "\n"))
        return out


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to summary.json")
