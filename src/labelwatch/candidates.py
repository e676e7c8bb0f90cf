"""Relabel candidates: which rows they are, how they are ranked, and reading them back.

Candidates are the samples flagged ``is_candidate`` by LabelWatch's candidate rule (by
default confident learning on the window-averaged probabilities mixed with the neighbours'
labels, or few agreeing neighbours; see :class:`labelwatch.LabelWatch`), ranked by
``label_quality`` ascending (most likely mislabelled first), with ``rank`` (1 = review
first) and ``suggested_label`` / ``suggested_name`` (the guess of the true class).

:func:`read_candidates` returns them with where they came from (class names, epoch, the
W&B run, the artifact version): what the relabel commands need to record provenance.
Everything is read from parquet and JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "CandidateSet",
    "first_watch_column",
    "from_csv_safe",
    "leaning",
    "load_candidates",
    "read_candidates",
    "records_json",
    "refuse_input_overwrite",
    "save_csv",
    "select_candidates",
    "to_csv_safe",
    "to_records",
    "watch_column",
    "watch_columns",
    "write_table",
]

_ARTIFACT_REF = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+$")
_EPOCH_DIR = re.compile(r"epoch=(\d+)")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A leading quote is escaped too (doubled), so from_csv_safe restores every cell exactly.
_ESCAPED_PREFIXES = (*_FORMULA_PREFIXES, "'")
TableFormat = Literal["csv", "parquet", "json"]
TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet", "json")
_WATCH_PREFIX = "watch_"
_FIRST_PREFIX = "first_"


def watch_column(class_name: str) -> str:
    """The column of a watched class's scores (``LabelWatch(watch_classes=...)``)."""
    return f"{_WATCH_PREFIX}{class_name}"


def first_watch_column(class_name: str) -> str:
    """The column of a watched class's scores in the first validation that scored each
    sample, before the model learned to overlook the class (``LabelWatch(watch_classes=...)``)."""
    return f"{_FIRST_PREFIX}{watch_column(class_name)}"


def watch_columns(columns: Iterable[Any]) -> dict[str, str]:
    """The watched classes' score columns among ``columns``, by class name."""
    return {
        str(c).removeprefix(_WATCH_PREFIX): c for c in columns if str(c).startswith(_WATCH_PREFIX)
    }


def leaning(frame: pd.DataFrame, class_name: str) -> pd.Series:
    """How far each row leans toward a watched class: the larger of its watch score now
    and in its first validation (the scores that make it a watch candidate); NaN where
    neither is known."""
    score = frame[watch_column(class_name)].astype(float)
    first = first_watch_column(class_name)
    if first in frame.columns:
        score = pd.Series(np.fmax(score, frame[first].astype(float)), index=frame.index)
    return score


@dataclass(frozen=True)
class CandidateSet:
    """Ranked candidates and their provenance.

    Attributes:
        frame: the ranked candidates (the same DataFrame :func:`load_candidates` returns).
        class_names: every class name in output order, when known (``summary.json``, the
            artifact metadata, or the run's local outputs); None otherwise.
        epoch: the validation epoch the candidates belong to.
        run: the W&B run id when the outputs belong to a W&B run, else the outputs folder.
        wandb_run_id: the W&B run id, or None when no W&B run is known.
        artifact: the ``relabel-candidates`` artifact version these rows are, as complete as
            known: ``entity/project/name:alias`` from the W&B API, ``project/name:epoch-<n>``
            from local outputs of a W&B run, else None.
        inputs: files and folders read; outputs must never be written there.
    """

    frame: pd.DataFrame
    class_names: list[str] | None = None
    epoch: int | None = None
    run: str | None = None
    wandb_run_id: str | None = None
    artifact: str | None = None
    inputs: tuple[Path, ...] = field(default_factory=tuple)


def refuse_input_overwrite(output: str | Path, inputs: tuple[Path, ...] | list[Path]) -> None:
    """Raise ValueError when ``output`` is one of ``inputs`` or lies inside an input folder."""
    target = Path(output).resolve()
    for item in inputs:
        item = Path(item).resolve()
        if target == item or (item.is_dir() and target.is_relative_to(item)):
            raise ValueError(
                f"refusing to write {output}: it is (or lies in) the input {item};"
                " choose another output path."
            )


def select_candidates(
    samples: pd.DataFrame,
    max_candidates: int | None = None,
    *,
    flag_column: str = "is_confident_mismatch",
    keep_column: str | None = None,
) -> pd.DataFrame:
    """The rows flagged in ``flag_column``, most likely mislabelled first (lowest
    ``label_quality``), at most ``max_candidates`` plus those flagged in ``keep_column``,
    which the budget never drops. LabelWatch passes ``"is_candidate"`` and
    ``"is_watch_candidate"`` (the watched classes' flags, when it has them)."""
    # Rank positions first and copy the chosen rows once (at 100k rows a filtered and
    # then sorted frame was two full copies).
    flagged = np.flatnonzero(samples[flag_column].astype(bool).to_numpy())
    quality = samples["label_quality"].to_numpy(float)[flagged]
    order = flagged[np.argsort(quality, kind="stable")]  # NaN last, as sort_values
    if max_candidates is not None:
        within = np.arange(len(order)) < max_candidates
        if keep_column is not None and keep_column in samples.columns:
            within |= samples[keep_column].astype(bool).to_numpy()[order]
        order = order[within]
    ranked = samples.take(order).reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


def to_csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text cells cannot run as spreadsheet formulas (prefixed with ').

    Text starting with ``= + - @``, a tab or a carriage return gets a leading ``'``; text
    that already starts with ``'`` gets another, so :func:`from_csv_safe` undoes it exactly.
    Numbers are untouched.
    """
    safe = frame.copy(deep=False)  # columns are replaced, never changed in place
    for column in safe.columns:
        values = safe[column]
        if values.dtype == object:  # may mix text with other objects: cell by cell
            safe[column] = values.map(_neutralise)
        elif pd.api.types.is_string_dtype(values):  # text only: one vectorised test
            risky = values.str.startswith(_ESCAPED_PREFIXES).fillna(False).to_numpy(bool)
            if risky.any():
                safe[column] = values.where(~risky, "'" + values)
    return safe


def save_csv(frame: pd.DataFrame, path: str | Path, **options: Any) -> None:
    """``frame.to_csv(path, index=False, **options)``, quoting every text cell when one
    holds a carriage return: pandas writes such a cell unquoted, and reads it back as a line
    break (an id "a\rb" would split its row in two)."""
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    returns = any(frame[c].astype(str).str.contains("\r", regex=False).any() for c in text)
    quoting = csv.QUOTE_NONNUMERIC if returns else csv.QUOTE_MINIMAL
    frame.to_csv(path, index=False, quoting=quoting, **options)


def from_csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Undo :func:`to_csv_safe` on a CSV read back as text (one leading ' removed)."""
    restored = frame.copy()
    for column in restored.columns:
        if restored[column].dtype == object or pd.api.types.is_string_dtype(restored[column]):
            restored[column] = restored[column].map(_restore)
    return restored


def _neutralise(value: object) -> object:
    if isinstance(value, str) and value.startswith(_ESCAPED_PREFIXES):
        return "'" + value
    return value


def _restore(value: object) -> object:
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(_ESCAPED_PREFIXES):
        return value[1:]
    return value


def write_table(frame: pd.DataFrame, path: str | Path, fmt: TableFormat) -> None:
    """Write ``frame`` atomically as csv (formula-safe), parquet or JSON records."""
    from labelwatch.sinks.local import write_atomic

    if fmt not in TABLE_FORMATS:
        raise ValueError(f"`format` must be one of {TABLE_FORMATS}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        write_atomic(path, lambda p: save_csv(to_csv_safe(frame), p))
    elif fmt == "parquet":
        write_atomic(path, lambda p: frame.to_parquet(p, index=False))
    else:
        text = records_json(frame)
        write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def records_json(frame: pd.DataFrame) -> str:
    """The rows as a JSON list of records (what ``write_table`` writes as json)."""
    return json.dumps(to_records(frame), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts: numpy scalars unwrapped, NaN and missing as None."""
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
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
        epoch: which epoch; the latest when None. For an artifact reference it picks the
            alias ``epoch-<n>``.

    Raises:
        FileNotFoundError: when ``source`` holds no candidates (or not for ``epoch``).
    """
    return read_candidates(source, epoch=epoch).frame


def read_candidates(source: str | Path, *, epoch: int | None = None) -> CandidateSet:
    """Like :func:`load_candidates`, with class names, epoch, run and artifact version."""
    path = Path(source)
    if not path.exists():
        if _ARTIFACT_REF.match(str(source)):
            return _from_artifact(str(source), epoch)
        raise FileNotFoundError(
            f"{source!r} is neither an existing folder nor a W&B artifact reference of the form"
            " 'entity/project/relabel-candidates-<run id>:alias'."
        )
    if (path / "files").is_dir() and any(path.glob("*.wandb")):
        return _from_wandb_run(path, epoch)
    return _from_local(_local_epoch_dir(path, epoch), path)


def _from_local(epoch_dir: Path, source: Path) -> CandidateSet:
    frame = pd.read_parquet(epoch_dir / "candidates.parquet")
    summary_path = epoch_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    epoch = summary.get("epoch")
    if epoch is None and epoch_dir.name.startswith("epoch=") and epoch_dir.name[6:].isdigit():
        epoch = int(epoch_dir.name[6:])
    dataloader = summary.get("dataloader")
    root = epoch_dir.parent.parent if dataloader else epoch_dir.parent
    # The run the epoch was logged to (a resumed fit may log to a new run), else the one
    # whose folder these outputs sit in.
    project, run_id = summary.get("wandb_project"), summary.get("wandb_run_id")
    if run_id is None:
        project, run_id = _wandb_run_of_outputs(root)
    artifact = None
    if run_id is not None:
        artifact = f"{project}/{_artifact_name(run_id, dataloader)}:epoch-{epoch}"
    return CandidateSet(
        frame=frame,
        class_names=summary.get("class_names"),
        epoch=epoch,
        run=run_id if run_id is not None else str(root.resolve()),
        wandb_run_id=run_id,
        artifact=artifact,
        # The run's outputs (all its epochs), when they were named or the epoch folder
        # named sits among them; else that one epoch folder (a copy kept elsewhere).
        inputs=(root if _among_epochs(root, source) else source,),
    )


def _among_epochs(root: Path, source: Path) -> bool:
    return root.resolve().is_relative_to(source.resolve()) or len(_epochs_under(root)) > 1


def _wandb_run_of_outputs(root: Path) -> tuple[str | None, str | None]:
    """(project, run id) when ``root`` is ``<save_dir>/<project>/<run id>/labelwatch``
    written next to ``<save_dir>/wandb/*run-*-<run id>``, as a WandbLogger lays it out."""
    root = root.resolve()
    if root.name != "labelwatch" or len(root.parents) < 3:
        return None, None
    run_id, project, save_dir = root.parent.name, root.parent.parent.name, root.parents[2]
    if any(p.is_dir() for p in (save_dir / "wandb").glob(f"*run-*-{_glob_escape(run_id)}")):
        return project, run_id
    return None, None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _artifact_name(run_id: str, dataloader: str | None) -> str:
    from labelwatch.sinks.wandb import artifact_name  # imported here: sinks import this module

    return artifact_name(run_id, dataloader)


def _local_epoch_dir(path: Path, epoch: int | None) -> Path:
    if (path / "candidates.parquet").is_file():
        named = _EPOCH_DIR.fullmatch(path.name)
        if epoch is not None and named and int(named.group(1)) != epoch:
            raise FileNotFoundError(
                f"{path} holds epoch {named.group(1)}, not epoch {epoch}: pass its parent"
                f" folder {path.parent} to choose the epoch."
            )
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


def _from_wandb_run(run_dir: Path, epoch: int | None) -> CandidateSet:
    table_root = run_dir / "files" / "media" / "table"
    tables = list(table_root.glob("**/candidates_*.table.json"))
    if not tables:
        raise FileNotFoundError(f"The W&B run folder {run_dir} holds no candidates tables.")
    keys = sorted({p.parent.relative_to(table_root).as_posix() for p in tables})
    if len(keys) > 1:  # several validation dataloaders, each under its own key
        raise FileNotFoundError(
            f"The W&B run folder {run_dir} holds the candidates of several validation"
            f" dataloaders ({', '.join(k + '/candidates' for k in keys)}); pass the local outputs"
            " of one instead: <save_dir>/<project>/<run id>/labelwatch/<dataloader>."
        )
    stream = keys[0].rsplit("/", 1)[-1] if "/" in keys[0] else None  # the dataloader's name
    # W&B names table files <key>_<step>_<hash>; the highest step is the latest epoch.
    tables.sort(key=lambda p: int(p.name.split("_")[-2]))
    frames = []
    for table_path in tables:
        table = json.loads(table_path.read_text())
        frames.append(pd.DataFrame(table["data"], columns=table["columns"]))
    epochs = [_table_epoch(path, frame) for path, frame in zip(tables, frames, strict=True)]
    if epoch is None:
        chosen, found_epoch = frames[-1], epochs[-1]
    else:
        matching = [f for f, e in zip(frames, epochs, strict=True) if e == epoch]
        if not matching:
            raise FileNotFoundError(
                f"No candidates for epoch {epoch} in the W&B run {run_dir}; found"
                f" {sorted(set(epochs))}."
            )
        chosen, found_epoch = matching[-1], epoch
    frame = chosen.drop(columns=["media"], errors="ignore").reset_index(drop=True)
    # The id from run-<id>.wandb: the folder name may end in a suffix (a second run with
    # the same id started in the same second is offline-run-<time>-<id>-1).
    run_id = next(run_dir.glob("run-*.wandb")).stem.removeprefix("run-")
    # The WandbLogger's local outputs sit beside the run: <save_dir>/<project>/<run id>/.
    summary, project = {}, None
    save_dir = run_dir.resolve().parent.parent
    outputs = save_dir.glob(f"*/{_glob_escape(run_id)}/labelwatch*/**/epoch=*/summary.json")
    for summary_path in outputs:
        if found_epoch is None or summary_path.parent.name != f"epoch={found_epoch}":
            continue
        found = json.loads(summary_path.read_text())
        if found.get("dataloader") in (None, stream):
            summary = found
            project = summary_path.relative_to(save_dir).parts[0]
            if summary.get("num_candidates", 0) > len(frame):  # W&B tables stop at max_points
                warnings.warn(
                    f"The W&B run's candidates table holds the top {len(frame)} of the"
                    f" {summary['num_candidates']} candidates of epoch {found_epoch}"
                    f" (`max_points`); the local outputs {summary_path.parent} hold them all.",
                    stacklevel=3,
                )
            break
    class_names = summary.get("class_names") or _names_from_columns(frames)
    artifact = None
    if project is not None and found_epoch is not None:
        artifact = (
            f"{project}/{_artifact_name(run_id, summary.get('dataloader'))}:epoch-{found_epoch}"
        )
    return CandidateSet(
        frame=frame,
        class_names=class_names,
        epoch=found_epoch,
        run=run_id,
        wandb_run_id=run_id,
        artifact=artifact,
        inputs=(run_dir / "files",),
    )


def _table_epoch(path: Path, frame: pd.DataFrame) -> int | None:
    """The epoch of a logged candidates table; an empty one (no candidates that epoch)
    takes it from the samples table logged beside it, at the same step."""
    if len(frame):
        return int(frame["epoch"].iloc[0])
    step = path.name.split("_")[-2]
    for sibling in path.parent.glob(f"*_{step}_*.table.json"):
        if sibling.name.startswith("candidates_") or sibling.name.split("_")[-2] != step:
            continue
        table = json.loads(sibling.read_text())
        if table["data"] and "epoch" in table["columns"]:
            return int(table["data"][0][table["columns"].index("epoch")])
    return None


def _names_from_columns(frames: list[pd.DataFrame]) -> list[str] | None:
    """Class names from (index, name) column pairs, when they cover every index."""
    names: dict[int, str] = {}
    for frame in frames:
        for prefix in ("given", "predicted", "suggested"):
            if f"{prefix}_label" in frame and f"{prefix}_name" in frame:
                pairs = zip(frame[f"{prefix}_label"], frame[f"{prefix}_name"], strict=True)
                names.update((int(i), str(n)) for i, n in pairs)
    if not names or sorted(names) != list(range(max(names) + 1)):
        return None
    return [names[i] for i in range(len(names))]


def _from_artifact(reference: str, epoch: int | None) -> CandidateSet:
    """Download through the W&B public API; this path needs a reachable W&B server."""
    import wandb

    if epoch is not None:
        reference = f"{reference.rsplit(':', 1)[0]}:epoch-{epoch}"
    artifact = wandb.Api().artifact(reference, type="relabel-candidates")
    folder = Path(artifact.download())
    frame = pd.read_parquet(folder / "candidates.parquet")
    metadata = dict(artifact.metadata or {})
    # relabel-candidates-[<dataloader>-]<run id>: run ids hold no '-'.
    run_id = reference.rsplit("/", 1)[-1].split(":", 1)[0].rsplit("-", 1)[-1]
    return CandidateSet(
        frame=frame,
        class_names=metadata.get("class_names"),
        epoch=metadata.get("epoch", epoch),
        run=run_id,
        wandb_run_id=run_id,
        artifact=reference,
        inputs=(folder,),
    )
