"""Apply reviewed relabel decisions to a label file, with an audit of what changed and why.

The labels file is a CSV with at least ``sample_id`` and a label column (``label`` by
default). Its labels are class names, or class indices (``0``, ``1``, ...) into the class
names; the corrected file keeps the same form, so the next training run reads it as it
read the original.

Decisions come from a reviewed candidates CSV (a ``decision`` column per row) or a Label
Studio JSON export (see :mod:`labelwatch.labelstudio`):

- ``accept``: take the candidate's ``suggested_name``;
- ``reject``: keep the current label;
- a class name: relabel to that class;
- blank: no decision for that row.

``accept`` and ``reject`` are read case-insensitively and win over a class of that name;
class names are case-sensitive. Sample ids, labels and decisions are compared with the
spaces around them stripped (the labels file's cells are kept as written where unchanged).
The valid class names are ``class_names`` when given, else the candidates' class names
(``summary.json``), else the labels found in the labels file.

:func:`apply_decisions` refuses, listing every offending row in one message: sample ids
that are not in the labels file, class names that are not valid, and conflicting
decisions (one id given two different new labels by rows, files or annotators). Agreeing
duplicates are merged.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from labelwatch.candidates import from_csv_safe, save_csv, to_csv_safe
from labelwatch.sinks.local import write_atomic

__all__ = [
    "AUDIT_COLUMNS",
    "RelabelError",
    "apply_decisions",
    "check_wandb_online",
    "decisions_from_table",
    "log_corrections_to_wandb",
    "read_decisions",
    "read_labels",
    "write_corrections",
]

log = logging.getLogger(__name__)

AUDIT_COLUMNS = (
    "sample_id",
    "old_label",
    "new_label",
    "changed",
    "decision",
    "decision_source",
    "epoch",
    "run",
)
DECISION_COLUMNS = (
    "sample_id",
    "action",
    "label",
    "decision",
    "suggested_name",
    "decision_source",
    "epoch",
    "run",
    "origin",
)
CORRECTIONS_ARTIFACT = "label-corrections"
_INLINE = 5  # longer lists of problems are written one a line


class RelabelError(ValueError):
    """Decisions that cannot be applied; the message lists every problem found."""


def read_labels(
    path: str | Path, *, label_column: str = "label", id_column: str = "sample_id"
) -> pd.DataFrame:
    """The labels CSV as text, cells exactly as written (ids like ``007`` stay ``007``).
    Comma, semicolon (a spreadsheet's CSV in some locales) or tab separated. The ids are in
    ``id_column`` (UrbanSound8K's ``slice_file_name``, say), called ``sample_id`` in the
    frame returned; the file written keeps its own header.

    The file's form (separator, byte-order mark, line ends and header cells as written;
    columns with an empty or repeated header are named ``Unnamed: <i>`` and ``<name>.<k>``)
    is kept in ``attrs["csv_form"]``, which :func:`write_corrections` writes back.
    """
    path = Path(path)
    labels, form = _read_csv_text(path, required=(id_column, label_column))
    labels.attrs["csv_form"] = {k: form[k] for k in ("sep", "bom", "lineterminator", "header")}
    missing = [c for c in (id_column, label_column) if c not in labels.columns]
    if id_column != "sample_id" and "sample_id" in labels.columns:
        raise RelabelError(
            f"{path} has a sample_id column besides the id column {id_column!r}: drop"
            " --id-column to use sample_id, or rename one of them"
        )
    if missing:
        fixes = []
        if id_column in missing:
            fixes.append("choose the column of LabelWatch's sample ids with --id-column")
        if label_column in missing:
            fixes.append("choose the label column with --label-column")
        raise RelabelError(
            f"{path} lacks the column(s) {missing}; it has {list(labels.columns)}"
            f" ({'; '.join(fixes)})"
        )
    return labels.rename(columns={id_column: "sample_id"})


def read_decisions(path: str | Path) -> pd.DataFrame:
    """Decisions from a reviewed candidates ``.csv`` or a Label Studio export ``.json``.

    Returns one row per decision with the columns ``sample_id`` (text), ``action``
    (``accept``, ``reject`` or ``relabel``), ``label`` (the class for ``relabel``),
    ``decision`` (as written), ``suggested_name``, ``decision_source`` (``csv:<file>`` or
    ``label-studio:<file>``), ``epoch``, ``run`` and ``origin`` (where in the file).
    Blank decisions are left out. Only CSV and JSON are read (never pickle).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _reviewed_json(path)
        if records is None:
            from labelwatch.labelstudio import read_export

            return read_export(path)
        return decisions_from_table(
            records, source=f"json:{path.name}", origins=[f"item {i}" for i in range(len(records))]
        )
    if suffix != ".csv":
        raise RelabelError(
            f"decisions must be a reviewed candidates .csv or .json, or a Label Studio export"
            f" .json, got {path.name!r}"
        )
    table, form = _read_csv_text(path, required=("sample_id", "decision"))
    lines = [f"line {line}" for line in form["lines"]]  # of the file, as an editor shows it
    return decisions_from_table(from_csv_safe(table), source=f"csv:{path.name}", origins=lines)


def decisions_from_table(
    table: pd.DataFrame, *, source: str = "table", origins: Sequence[str] | None = None
) -> pd.DataFrame:
    """Decisions from a candidates table with a ``decision`` column filled in by a reviewer
    (``accept``, ``reject``, a class name, or blank for none), e.g. ``load_candidates(...)``
    plus that column; the rows :func:`apply_decisions` takes, as :func:`read_decisions`
    makes them."""
    missing = [c for c in ("sample_id", "decision") if c not in table.columns]
    if missing:
        raise RelabelError(
            f"{source.split(':', 1)[-1]} lacks the column(s) {missing}: add a 'decision'"
            " column with accept, reject or a class name per row (blank = no decision)"
        )
    origins = list(origins) if origins is not None else [f"row {i}" for i in range(len(table))]
    rows = []
    for origin, row in zip(origins, table.to_dict("records"), strict=True):
        decision = _text(row["decision"])
        if not decision:
            continue
        keyword = decision.lower()
        action = keyword if keyword in ("accept", "reject") else "relabel"
        rows.append(
            {
                "sample_id": _text(row["sample_id"]),
                "action": action,
                "label": decision if action == "relabel" else None,
                "decision": decision,
                "suggested_name": _text(row.get("suggested_name")) or None,
                "decision_source": source,
                "epoch": _text(row.get("epoch")) or None,
                "run": _text(row.get("run")) or None,
                "origin": origin,
            }
        )
    return pd.DataFrame(rows, columns=list(DECISION_COLUMNS), dtype=object)


def _text(value: Any) -> str:
    """A cell as stripped text; missing values (None, NaN) as ''."""
    return "" if _present(value) is None else str(value).strip()


def _reviewed_json(path: Path) -> pd.DataFrame | None:
    """A reviewed candidates .json (``labelwatch candidates -o x.json`` plus decisions) as a
    table of text; None for anything else (a Label Studio export)."""
    import json

    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # read_export reports it
    flat = isinstance(items, list) and items and all(isinstance(i, dict) for i in items)
    if not flat or not all("sample_id" in i and "data" not in i for i in items):
        return None  # Label Studio tasks carry their fields under "data"
    if not any("decision" in i for i in items):
        raise RelabelError(
            f"{path} lists samples but no 'decision': add one to each item you decided"
            " (accept, reject or a class name) in `labelwatch candidates -o review.json`'s"
            " output; from Label Studio, export the project as JSON (not JSON_MIN)"
        )
    return pd.DataFrame(items)  # an item without a decision: blank, no decision


def _read_csv_text(path: Path, *, required: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A CSV as text cells, separated by commas, or by the semicolons or tabs that the
    header shows (spreadsheets save ';' in locales where ',' is the decimal mark).

    Returns the table and its form: ``sep``, ``bom``, ``lineterminator``, ``header`` (the
    header cells as written; the table's columns are named as pandas names them, an empty
    cell ``Unnamed: <i>`` and a repeated one ``<name>.<k>``) and ``lines`` (the line of the
    file each row starts on). Blank lines are skipped.
    """
    if path.suffix.lower() in (".parquet", ".pq", ".xlsx", ".xls"):
        raise RelabelError(
            f"{path} is not a CSV file: save it as CSV (UTF-8), e.g."
            f" pandas.read_parquet({str(path)!r}).to_csv('labels.csv', index=False)"
        )
    try:
        bom = path.read_bytes()[:3] == codecs.BOM_UTF8
        with path.open(encoding="utf-8-sig", newline="") as file:
            text = io.StringIO(file.read(), newline="")
        first = text.readline()
        text.seek(0)
        separator = next((sep for sep in (",", ";", "\t") if _splits(first, sep, required)), ",")
        reader = csv.reader(text, delimiter=separator)
        header, rows, lines = None, [], []
        while True:
            start = reader.line_num + 1  # the line the next row starts on
            try:
                cells = next(reader)
            except StopIteration:
                break
            if not cells:
                continue  # a blank line
            if header is None:
                header = cells
            elif len(cells) > len(header):
                raise RelabelError(
                    f"{path}, line {start}: {len(cells)} cells, but the header has"
                    f" {len(header)}; quote cells that hold a {separator!r}"
                )
            else:  # a short row: the missing cells are empty
                rows.append(cells + [""] * (len(header) - len(cells)))
                lines.append(start)
    except UnicodeDecodeError as err:
        raise RelabelError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as 'CSV UTF-8'"
        ) from err
    except csv.Error as err:
        raise RelabelError(f"{path} is not a readable CSV file: {err}") from err
    if header is None:
        raise RelabelError(f"{path} is empty: it needs a header row with {list(required)}")
    ending = first[len(first.rstrip("\r\n")) :] or "\n"
    form = {
        "sep": separator,
        "bom": bom,
        "lineterminator": ending,
        "header": header,
        "lines": lines,
    }
    return pd.DataFrame(rows, columns=_column_names(header), dtype=str), form


def _column_names(header: list[str]) -> list[str]:
    """Header cells named as pandas.read_csv names them: unique, none empty."""
    names: list[str] = []
    for position, cell in enumerate(header):
        name = cell or f"Unnamed: {position}"
        base, count = name, 0
        while name in names:
            count += 1
            name = f"{base}.{count}"
        names.append(name)
    return names


def _splits(header: str, separator: str, required: Sequence[str]) -> bool:
    names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(separator)]
    return all(column in names for column in required)


def apply_decisions(
    labels: pd.DataFrame,
    decisions: pd.DataFrame | Sequence[pd.DataFrame],
    *,
    class_names: Sequence[str] | None = None,
    label_column: str = "label",
    candidates: pd.DataFrame | None = None,
    epoch: int | None = None,
    run: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply decisions to labels; returns ``(corrected labels, audit)``.

    Args:
        labels: the label table (``sample_id`` and ``label_column``), e.g. from
            :func:`read_labels`; a copy with the decided labels changed is returned.
        decisions: one or several tables from :func:`read_decisions`, or candidates
            tables with a reviewer's ``decision`` column (:func:`decisions_from_table`).
        class_names: the valid classes in index order; needed when ``labels`` holds
            class indices. Defaults to the labels present in ``labels``.
        label_column: the column holding the labels.
        candidates: the candidates the decisions were made on; gives ``suggested_name``
            for ``accept`` rows that lack it.
        epoch, run: recorded in the audit for decisions that do not carry their own.

    Returns:
        The corrected labels (same rows, columns and order as ``labels``) and the audit,
        one row per decided sample with :data:`AUDIT_COLUMNS` (``changed`` is false for
        rejects and for choices equal to the current label).

    Raises:
        RelabelError: listing unknown sample ids, unknown class names and conflicting
            decisions; also for duplicate ids in ``labels`` and for class indices
            without ``class_names``.
    """
    frames = [decisions] if isinstance(decisions, pd.DataFrame) else list(decisions)
    # a reviewed candidates table straight from pandas: read its `decision` column
    frames = [f if "action" in f.columns else decisions_from_table(f) for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = table.reindex(columns=list(DECISION_COLUMNS)).astype(object)
    if label_column not in labels.columns or "sample_id" not in labels.columns:
        raise RelabelError(
            f"the labels need 'sample_id' and {label_column!r} columns;"
            f" found {list(labels.columns)}"
        )
    ids = labels["sample_id"].astype(str).str.strip()  # as decisions read them
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise RelabelError(f"the labels hold these sample ids twice or more: {_listed(duplicated)}")
    current = dict(zip(ids, map(_label_text, labels[label_column].tolist()), strict=True))
    to_name, to_file, valid = _label_codec(list(current.values()), class_names)

    suggested = {}
    if candidates is not None and "suggested_name" in candidates:
        suggested = dict(
            zip(
                candidates["sample_id"].astype(str).str.strip(),
                candidates["suggested_name"],
                strict=True,
            )
        )
    unknown_ids, unknown_names, no_suggestion, other_run, other_epoch = [], [], [], [], []
    resolved, misspelt = [], set()
    for row in table.to_dict("records"):
        sample_id = str(row["sample_id"]).strip()  # ids compare stripped on every route
        where = f"{sample_id} ({row['decision_source']}, {row['origin']})"
        if sample_id not in current:
            unknown_ids.append(where)
            continue
        old_name = to_name(current[sample_id])
        if row["action"] == "reject":
            new_name = old_name
        elif row["action"] == "accept":
            new_name = _present(row["suggested_name"])
            if new_name is None and candidates is not None:  # the candidates suggest
                if run is not None and _differs(row["run"], run):
                    other_run.append(f"{where}: run {row['run']}")
                    continue
                if epoch is not None and _differs(row["epoch"], epoch):
                    other_epoch.append(f"{where}: epoch {row['epoch']}")
                    continue
                new_name = suggested.get(sample_id)
            if new_name is None:
                no_suggestion.append(where)
                continue
        else:
            new_name = str(row["label"]).strip()
        if row["action"] != "reject" and new_name not in valid:
            unknown_names.append(f"{new_name!r} for {where}")
            misspelt.add(new_name)
            continue
        resolved.append({**row, "sample_id": sample_id, "new_name": new_name})

    conflicts = []
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in resolved:
        by_id.setdefault(row["sample_id"], []).append(row)
    for sample_id, rows in by_id.items():
        if len({r["new_name"] for r in rows}) > 1:
            choices = ", ".join(
                f"{r['new_name']} ({r['decision']}; {r['decision_source']}, {r['origin']})"
                for r in rows
            )
            conflicts.append(f"{sample_id}: {choices}")

    problems = []
    if unknown_ids:
        problems.append(f"unknown sample ids (not in the labels): {_listed(unknown_ids)}")
    if unknown_names:
        problems.append(
            f"unknown class names (valid: {sorted(valid)}; pass --class-names or --candidates"
            f" to name them all): {_listed(unknown_names)}"
        )
        by_case = {name.lower(): name for name in valid}
        hints = [
            f"{by_case[n.lower()]!r} for {n!r}" for n in sorted(misspelt) if n.lower() in by_case
        ]
        if hints:
            problems.append(f"class names are case-sensitive: did you mean {', '.join(hints)}?")
    for other, of, fix in (
        (other_run, f"run than the candidates' ({run})", "pass that run's candidates"),
        (other_epoch, f"epoch than the candidates' ({epoch})", "pass --epoch"),
    ):
        if other:
            problems.append(
                f"'accept' decided on another {of}, whose suggested_name it would take: {fix},"
                f" or keep the suggested_name column: {_listed(other)}"
            )
    if no_suggestion:
        where = (
            "not among the candidates, which give the suggestions"
            if candidates is not None
            else "without a suggested_name (add that column or pass --candidates)"
        )
        problems.append(f"'accept' {where}: {_listed(no_suggestion)}")
    if conflicts:
        problems.append(f"conflicting decisions: {_listed(conflicts)}")
    if problems:
        raise RelabelError("cannot apply the decisions:\n  " + "\n  ".join(problems))

    corrected = labels.copy()
    audit_rows = []
    for sample_id, rows in by_id.items():
        old = current[sample_id]
        new_name = rows[0]["new_name"]
        new = old if new_name == to_name(old) else to_file(new_name)
        audit_rows.append(
            {
                "sample_id": sample_id,
                "old_label": old,
                "new_label": new,
                "changed": new != old,
                "decision": _joined(r["decision"] for r in rows),
                "decision_source": _joined(r["decision_source"] for r in rows),
                "epoch": _joined(_first_present(r["epoch"], epoch) for r in rows),
                "run": _joined(_first_present(r["run"], run) for r in rows),
            }
        )
    changes = {r["sample_id"]: r["new_label"] for r in audit_rows if r["changed"]}
    if changes:
        mask = ids.isin(list(changes)).to_numpy()
        new_labels = ids[mask].map(changes)
        column = corrected[label_column]
        categorical = isinstance(column.dtype, pd.CategoricalDtype)
        kind = column.cat.categories.dtype if categorical else column.dtype
        if pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind):
            new_labels = pd.to_numeric(new_labels).astype(kind)  # class indices
        if categorical:  # pandas refuses a value outside the categories: add it first
            added = sorted(set(new_labels) - set(column.cat.categories))
            corrected[label_column] = column.cat.add_categories(added)
        corrected.loc[mask, label_column] = new_labels.to_numpy()
    audit = pd.DataFrame(audit_rows, columns=list(AUDIT_COLUMNS))
    return corrected, audit


def _differs(recorded: Any, expected: Any) -> bool:
    """A decision's recorded run or epoch is known and is not ``expected``."""
    recorded = _present(recorded)
    return recorded is not None and str(recorded).strip() != str(expected)


def _label_codec(values: list[str], class_names: Sequence[str] | None) -> tuple[Any, Any, set]:
    """(file value -> class name, class name -> file value, valid class names)."""
    if class_names is None:
        if values and all(v.isdigit() for v in values):
            raise RelabelError(
                "the labels look like class indices; pass the class names (--class-names, or"
                " --candidates whose summary.json lists them) to map decisions onto indices"
            )
        return (lambda v: v), (lambda n: n), {v for v in values if v}
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise RelabelError(f"`class_names` must be distinct, got {names}")
    valid = set(names)
    present = [v for v in values if v]
    by_index = bool(present) and not all(v in valid for v in present)
    by_index = by_index and all(v.isdigit() for v in present)
    if by_index and max(int(v) for v in present) >= len(names):
        raise RelabelError(
            f"the labels look like class indices up to {max(int(v) for v in present)}, but"
            f" only {len(names)} class names are known: {names}"
        )
    if by_index:
        to_name = lambda v: names[int(v)] if v.isdigit() else v  # noqa: E731
        return to_name, (lambda n: str(names.index(n))), valid
    if present and not any(v in valid for v in present):
        # no label of the file is a class name: a decision would write a name unlike all of
        # them (a model trained without class_names calls its classes '0', '1', ...)
        strangers = sorted(set(present))
        raise RelabelError(
            f"none of the labels in the labels file is among the class names {names} (pass"
            " the class names the labels use with --class-names, or --label-column if this"
            f" is not the label column): {_listed(strangers)}"
        )
    return (lambda v: v), (lambda n: n), valid


def _label_text(value: Any) -> str:
    """A label as text, stripped as decisions are (a spreadsheet may keep ' siren '), as
    the CLI reads its cell: a missing one (None, NaN) as '', and a whole float as an
    integer (pandas reads a column of class indices with an empty cell as floats: 2.0 is
    class 2)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _present(value: Any) -> Any:
    """None for missing values (None, NaN, empty text), else the value."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    return value


def _first_present(value: Any, default: Any) -> Any:
    present = _present(value)
    return default if present is None else present


def _joined(values: Any) -> str:
    seen: list[str] = []
    for value in values:
        text = "" if value is None else str(value)
        if text and text not in seen:
            seen.append(text)
    return ";".join(seen)


def _listed(items: Sequence[str]) -> str:
    """Every item, so that one pass fixes them all: inline when few, else one a line."""
    if len(items) <= _INLINE:
        return ", ".join(items)
    return f"{len(items)} of them:" + "".join(f"\n    {item}" for item in items)


def write_corrections(
    corrected: pd.DataFrame, audit: pd.DataFrame, output: str | Path, audit_path: str | Path
) -> None:
    """Write the corrected labels and the audit, each atomically.

    The corrected labels are written cell for cell as read (no formula quoting), in the
    labels file's form when they come from :func:`read_labels` (its separator, byte-order
    mark, line ends and header row), so they stay a drop-in replacement for the labels file;
    the audit, a report for people, is a comma-separated CSV quoted with
    :func:`labelwatch.candidates.to_csv_safe`.
    """
    for path in (Path(output), Path(audit_path)):
        if path.suffix.lower() in (".parquet", ".pq", ".json", ".xlsx", ".xls"):
            raise RelabelError(
                f"the corrected labels and the audit are CSV files, like the labels file:"
                f" name them .csv, not {path.name!r}"
            )
    for path in (Path(output), Path(audit_path)):
        path.parent.mkdir(parents=True, exist_ok=True)
    form = corrected.attrs.get("csv_form") or {}
    options: dict[str, Any] = {
        "sep": form.get("sep", ","),
        "lineterminator": form.get("lineterminator", "\n"),
        "encoding": "utf-8-sig" if form.get("bom") else "utf-8",
    }
    if len(form.get("header") or ()) == len(corrected.columns):  # the header as written
        options["header"] = form["header"]
    write_atomic(Path(output), lambda p: save_csv(corrected, p, **options))
    write_atomic(Path(audit_path), lambda p: save_csv(to_csv_safe(audit), p))


def check_wandb_online() -> None:
    """Raise RelabelError unless W&B is online and logged in (no prompt, no network)."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        raise RelabelError("--log-wandb needs W&B, but WANDB_DISABLED is set")
    _refuse_offline(os.environ.get("WANDB_MODE", "online"))
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is a dependency
        raise RelabelError("--log-wandb needs the wandb package: pip install wandb") from err
    _refuse_offline(wandb.setup().settings.mode)  # also reads `wandb offline`'s settings
    if not wandb.login(prompt=False, verify=False):
        raise RelabelError("--log-wandb needs a W&B login: run `wandb login` first")


def _refuse_offline(mode: str) -> None:
    mode = "offline" if mode == "dryrun" else mode  # "dryrun": the old name, set by WandbLogger
    if mode in ("offline", "disabled"):
        raise RelabelError(
            f"--log-wandb needs an online W&B (the mode is {mode!r}: unset WANDB_MODE or run"
            " `wandb online`): the lineage links to the candidates artifact on the server"
        )


def log_corrections_to_wandb(
    output: str | Path,
    audit_path: str | Path,
    *,
    project: str,
    candidates_artifact: str,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Log ``label-corrections`` (corrected CSV + audit) with the candidates as its input.

    Starts a run of ``job_type="relabel"`` in ``project`` (``entity/project``), declares
    ``candidates_artifact`` (``entity/project/relabel-candidates-<run id>:alias``) as its
    input with ``use_artifact``, and logs an artifact of type ``label-corrections``, so the
    W&B lineage graph goes candidates -> relabel run -> corrections. Needs an online W&B
    (``use_artifact`` asks the server); this path is not exercised by the offline tests.
    Returns the URL of the run.
    """
    import wandb

    check_wandb_online()
    entity, _, name = project.rpartition("/")
    run = wandb.init(entity=entity or None, project=name, job_type="relabel")
    try:
        run.use_artifact(candidates_artifact)
        artifact = wandb.Artifact(
            CORRECTIONS_ARTIFACT,
            type=CORRECTIONS_ARTIFACT,
            description="Corrected labels and the audit of the relabel decisions.",
            metadata={"candidates": candidates_artifact, **(metadata or {})},
        )
        artifact.add_file(str(output), name=Path(output).name)
        artifact.add_file(str(audit_path), name=Path(audit_path).name)
        run.log_artifact(artifact)
        return str(run.url)
    finally:
        run.finish()
