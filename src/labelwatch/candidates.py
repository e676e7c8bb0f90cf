"""Relabel candidates: which rows they are, how they are ranked, and reading them back.

Candidates are the samples flagged ``is_confident_mismatch``, ranked by ``label_quality``
ascending (most likely mislabelled first), with ``rank`` (1 = review first) and
``suggested_label`` / ``suggested_name`` (confident learning's guess of the true class).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

__all__ = ["load_candidates", "select_candidates", "to_csv_safe"]

_ARTIFACT_REF = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+$")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def select_candidates(samples: pd.DataFrame, max_candidates: int | None = None) -> pd.DataFrame:
    """The flagged rows, most likely mislabelled first, at most ``max_candidates``."""
    flagged = samples[samples["is_confident_mismatch"].astype(bool)]
    ranked = flagged.sort_values("label_quality", kind="stable")
    if max_candidates is not None:
        ranked = ranked.head(max_candidates)
    ranked = ranked.reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


def to_csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text cells cannot run as spreadsheet formulas (prefixed with ')."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(_neutralise)
    return safe


def _neutralise(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def load_candidates(source: str | Path, *, epoch: int | None = None) -> pd.DataFrame:
    """Read relabel candidates back as a DataFrame, ranked.

    Args:
        source: one of
            - a local outputs folder (``.../labelwatch`` with ``epoch=<n>/`` inside, one
              ``epoch=<n>`` folder, or any folder holding exactly one such outputs folder);
            - a local W&B run folder (``wandb/offline-run-*`` or ``wandb/run-*``), read from
              the candidates tables the run logged;
            - a W&B artifact reference ``entity/project/relabel-candidates-<run id>:alias``,
              downloaded with ``wandb.Api`` (needs a W&B server and login).
        epoch: which epoch; the latest when None.

    Raises:
        FileNotFoundError: when ``source`` holds no candidates (or not for ``epoch``).
    """
    path = Path(source)
    if not path.exists():
        if _ARTIFACT_REF.match(str(source)):
            return _from_artifact(str(source))
        raise FileNotFoundError(
            f"{source!r} is neither an existing folder nor a W&B artifact reference of the form"
            " 'entity/project/relabel-candidates-<run id>:alias'."
        )
    if (path / "files").is_dir() and any(path.glob("*.wandb")):
        return _from_wandb_run(path, epoch)
    return pd.read_parquet(_local_epoch_dir(path, epoch) / "candidates.parquet")


def _local_epoch_dir(path: Path, epoch: int | None) -> Path:
    if (path / "candidates.parquet").is_file():
        return path
    epochs = _epochs_under(path)
    if not epochs:
        roots = sorted({p.parent.parent for p in path.glob("**/epoch=*/candidates.parquet")})
        if len(roots) > 1:
            listed = "\n  ".join(map(str, roots))
            raise FileNotFoundError(
                f"{path} holds several labelwatch outputs; pass one of:\n  {listed}"
            )
        if not roots:
            raise FileNotFoundError(
                f"No labelwatch outputs under {path}: expected epoch=<n>/candidates.parquet."
            )
        epochs = _epochs_under(roots[0])
    if epoch is None:
        return epochs[max(epochs)]
    if epoch not in epochs:
        raise FileNotFoundError(
            f"No candidates for epoch {epoch} in {path}; found {sorted(epochs)}."
        )
    return epochs[epoch]


def _epochs_under(root: Path) -> dict[int, Path]:
    found = {}
    for child in root.glob("epoch=*"):
        number = child.name.split("=", 1)[1]
        if number.isdigit() and (child / "candidates.parquet").is_file():
            found[int(number)] = child
    return found


def _from_wandb_run(run_dir: Path, epoch: int | None) -> pd.DataFrame:
    tables = list((run_dir / "files" / "media" / "table").glob("**/candidates_*.table.json"))
    if not tables:
        raise FileNotFoundError(f"The W&B run folder {run_dir} holds no candidates tables.")
    # W&B names table files <key>_<step>_<hash>; the highest step is the latest epoch.
    tables.sort(key=lambda p: int(p.name.split("_")[-2]))
    frames = []
    for table_path in tables:
        table = json.loads(table_path.read_text())
        frames.append(pd.DataFrame(table["data"], columns=table["columns"]))
    if epoch is None:
        chosen = frames[-1]
    else:
        matching = [f for f in frames if len(f) and int(f["epoch"].iloc[0]) == epoch]
        if not matching:
            raise FileNotFoundError(f"No candidates for epoch {epoch} in the W&B run {run_dir}.")
        chosen = matching[-1]
    return chosen.drop(columns=["media"], errors="ignore").reset_index(drop=True)


def _from_artifact(reference: str) -> pd.DataFrame:
    """Download through the W&B public API; this path needs a reachable W&B server."""
    import wandb

    artifact = wandb.Api().artifact(reference, type="relabel-candidates")
    return pd.read_parquet(Path(artifact.download()) / "candidates.parquet")
