"""Label Studio: candidates as import tasks with a prediction, and decisions from its export.

Three formats, as Label Studio documents them (labelstud.io/guide/task_format,
labelstud.io/guide/predictions, labelstud.io/tags):

Import tasks (what :func:`to_tasks` makes; a JSON list, one task per candidate)::

    [{"data": {"audio": "https://host/audio/clips/4.wav", "sample_id": 1004,
               "review_note": "labelled dog_bark; model suggests siren (p=0.99); rank 1",
               "rank": 1, "given_name": "dog_bark", "suggested_name": "siren", ...,
               "path": "clips/4.wav", "run": "7a9kj4wp"},
      "predictions": [{"model_version": "labelwatch:7a9kj4wp:epoch-2", "score": 0.99,
                       "result": [{"from_name": "label", "to_name": "audio",
                                   "type": "choices", "value": {"choices": ["siren"]}}]}]}]

``data`` holds the media URL under the media tag's name (``audio`` or ``image``), the
``sample_id`` (how annotations map back to samples), a one-line ``review_note`` (it says
``suggested X; model predicts Y`` when the suggestion is not the model's own, and adds
``leans toward W (watch score s)`` for a watched class's candidate), and
every candidate column (scores and metadata such as ``path``; NaN as null). The one
prediction is the suggested label; its ``score`` is the model's top probability
(``confidence``), which Label Studio can sort tasks by, when the suggestion is the
model's prediction (a suggestion from the neighbours or a watched class has no score).
The reviewer submits it as it is (accept) or picks another class.

Labelling config (what :func:`labeling_config` makes)::

    <View>
      <Header value="$review_note"/>
      <Audio name="audio" value="$audio"/>          (or <Image name="image" value="$image"/>)
      <Choices name="label" toName="audio" choice="single" showInline="true">
        <Choice value="dog_bark"/> <Choice value="siren"/> ...
      </Choices>
    </View>

Export (what :func:`read_export` reads: Label Studio's "JSON" export, a list of tasks)::

    [{"id": 7, "data": {... as imported ...},
      "annotations": [{"id": 12, "completed_by": 1, "was_cancelled": false,
                       "ground_truth": false, "created_at": "...", "updated_at": "...",
                       "result": [{"id": "x1", "from_name": "label", "to_name": "audio",
                                   "type": "choices", "value": {"choices": ["siren"]}}]}],
      "predictions": [...], "drafts": [], ...}]

Each non-cancelled annotation with a ``label`` choice is one decision (a class name) for
``data["sample_id"]``. Cancelled (skipped) annotations, drafts, predictions and empty
results are ignored; an export in which nothing is read, but annotations choose under
another ``from_name`` or only drafts hold choices, is refused, naming those tasks.
Several annotations of one task are all kept as decisions, so if they disagree
:func:`labelwatch.relabel.apply_decisions` refuses them as conflicting (resolve it in
Label Studio and export again) rather than silently picking one; where exactly one of
them is marked ground truth (``"ground_truth": true``, Label Studio's way to settle a
disagreement), that one alone is the decision, and its ``decision_source`` says
``(ground truth)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote
from xml.sax.saxutils import quoteattr

import pandas as pd

from labelwatch.candidates import CandidateSet, first_watch_column, to_records, watch_columns
from labelwatch.relabel import DECISION_COLUMNS, _listed

__all__ = ["MEDIA_TAGS", "fill_template", "labeling_config", "read_export", "to_tasks"]

MediaTag = Literal["audio", "image"]
MEDIA_TAGS: dict[str, str] = {"audio": "Audio", "image": "Image"}
FROM_NAME = "label"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def fill_template(template: str, row: Mapping[str, Any]) -> str:
    """``template`` with each ``{column}`` replaced by the row's value, URL-quoted.

    Each value is split on ``/`` and every segment is percent-quoted, so the value stays
    a path below the template's root: values that are absolute (``/x``, ``\\x``, ``C:``)
    or hold a ``..`` segment (also as ``%2e%2e`` or between backslashes) are refused.

    Raises:
        ValueError: for a template with other braces than ``{column}``, a column the row
            lacks, an empty value, or a value that would escape the root.
    """
    leftover = _PLACEHOLDER.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError(
            f"`--data-template` may only hold {{column}} placeholders, got {template!r}"
        )

    def substitute(match: re.Match[str]) -> str:
        column = match.group(1)
        if column not in row:
            raise ValueError(
                f"`--data-template` names {{{column}}}, which is not a candidate column;"
                f" columns: {sorted(row)}"
            )
        return _quoted_relative(row[column], column, row.get("sample_id"))

    return _PLACEHOLDER.sub(substitute, template)


def _quoted_relative(value: Any, column: str, sample_id: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        raise ValueError(f"sample {sample_id!r} has no {column!r} to fill the template with")
    text = str(value)
    segments = re.split(r"[/\\]", text)
    if text.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(text):
        raise ValueError(
            f"sample {sample_id!r}: {column}={text!r} is an absolute path; media paths must be"
            " relative to the template's root"
        )
    if any(unquote(segment).strip() == ".." for segment in segments):
        raise ValueError(
            f"sample {sample_id!r}: {column}={text!r} holds a '..' segment; media paths must"
            " stay below the template's root"
        )
    return "/".join(quote(segment, safe="") for segment in text.split("/"))


def labeling_config(class_names: Sequence[str], media: MediaTag = "audio") -> str:
    """The Label Studio labelling config: the media, a header, one single choice of class."""
    _check_media(media)
    if not class_names:
        raise ValueError("`class_names` must name at least one class")
    choices = "\n".join(f"    <Choice value={quoteattr(str(name))}/>" for name in class_names)
    return (
        "<View>\n"
        '  <Header value="$review_note"/>\n'
        f'  <{MEDIA_TAGS[media]} name="{media}" value="${media}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{media}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def to_tasks(
    candidates: CandidateSet,
    *,
    data_template: str,
    media: MediaTag = "audio",
    model_version: str | None = None,
) -> list[dict[str, Any]]:
    """One Label Studio import task per candidate, in rank order (format in the module doc).

    Raises:
        ValueError: for a bad template or a media path that would escape its root.
    """
    _check_media(media)
    frame = candidates.frame
    if model_version is None:
        run = candidates.wandb_run_id or "local"
        model_version = f"labelwatch:{run}:epoch-{candidates.epoch}"
    tasks = []
    for plain in to_records(frame):
        url, note = fill_template(data_template, plain), _review_note(plain)
        # The media URL and the note first (the columns cannot override them).
        data = {media: url, "sample_id": plain.get("sample_id"), "review_note": note, **plain}
        data[media], data["review_note"] = url, note
        if candidates.run is not None:
            data.setdefault("run", candidates.run)
        prediction: dict[str, Any] = {
            "model_version": model_version,
            "result": [
                {
                    "from_name": FROM_NAME,
                    "to_name": media,
                    "type": "choices",
                    "value": {"choices": [plain["suggested_name"]]},
                }
            ],
        }
        # The model's probability is the suggestion's score only when the model made it.
        if _suggested_by_the_model(plain) and plain.get("confidence") is not None:
            prediction["score"] = plain["confidence"]
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def _suggested_by_the_model(row: Mapping[str, Any]) -> bool:
    """Whether the suggestion is the model's argmax, not the neighbours' or a watched
    class's guess (rows without ``predicted_name`` count as the model's)."""
    return row.get("predicted_name", row.get("suggested_name")) == row.get("suggested_name")


def _review_note(row: Mapping[str, Any]) -> str:
    given, suggested = row.get("given_name"), row.get("suggested_name")
    if _suggested_by_the_model(row):
        note = f"labelled {given}; model suggests {suggested}"
    else:
        note = f"labelled {given}; suggested {suggested}; model predicts {row['predicted_name']}"
    if row.get("confidence") is not None:
        note += f" (p={row['confidence']:.2f})"
    scores = {}  # how far the row leans, now or in its first validation
    for name, column in watch_columns(row).items():
        values = [row.get(c) for c in (column, first_watch_column(name))]
        values = [v for v in values if v is not None]  # None: no score (NaN in the table)
        if values:
            scores[name] = max(values)
    if row.get("is_watch_candidate") and scores:
        name = max(scores, key=scores.get)
        note += f"; leans toward {name} (watch score {scores[name]:.1f})"
    if row.get("rank") is not None:
        note += f"; rank {row['rank']}"
    return note


def _check_media(media: str) -> None:
    if media not in MEDIA_TAGS:
        raise ValueError(f"`media` must be one of {tuple(MEDIA_TAGS)}, got {media!r}")


def read_export(path: str | Path) -> pd.DataFrame:
    """Decisions from a Label Studio JSON export: one row per non-cancelled annotation
    (only the ground-truth one of a task that marks exactly one of several as such).

    Columns: ``sample_id`` (text), ``action`` (``"relabel"``), ``label`` (the chosen class),
    ``decision`` (the same), ``suggested_name``, ``decision_source``
    (``label-studio:<file name>``, plus `` (ground truth)`` where that settled the task),
    ``epoch``, ``run``, ``origin`` (task and annotation id).

    Raises:
        ValueError: when the file is not a JSON list of tasks, a task lacks
            ``data.sample_id``, one annotation picks several classes, or no annotation
            picks a class under ``from_name="label"`` while some choose under another
            name or only drafts hold choices.
    """
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ValueError(
            f"{path} is not a Label Studio JSON export (a list of tasks); export with the"
            " 'JSON' format, not 'JSON_MIN' or 'CSV'."
        )
    rows, missing, multiple, unread = [], [], [], []
    for position, task in enumerate(tasks):
        task_id = task.get("id", f"#{position}")
        data = task.get("data") or {}
        if not isinstance(data, dict) or data.get("sample_id") is None:
            missing.append(str(task_id))
            continue
        decided = []
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            chosen = _choices(annotation.get("result") or [])
            if not chosen:
                continue
            if len(set(chosen)) > 1:
                multiple.append(f"{data['sample_id']} (task {task_id}): {sorted(set(chosen))}")
                continue
            decided.append((annotation, chosen[0]))
        source = f"label-studio:{path.name}"
        truths = [d for d in decided if d[0].get("ground_truth") is True]
        if len(truths) == 1 and len(decided) > 1:  # how Label Studio settles a disagreement
            decided, source = truths, f"{source} (ground truth)"
        if not decided:
            unread.append(_unread(task, task_id))
        for annotation, label in decided:
            rows.append(
                {
                    "sample_id": str(data["sample_id"]).strip(),  # as the CSV route reads it
                    "action": "relabel",
                    "label": label,
                    "decision": label,
                    "suggested_name": data.get("suggested_name"),
                    "decision_source": source,
                    "epoch": data.get("epoch"),
                    "run": data.get("run"),
                    "origin": f"task {task_id}, annotation {annotation.get('id')}",
                }
            )
    if missing:
        raise ValueError(
            f"{path}: tasks without data.sample_id (not made by `labelwatch"
            f" export-label-studio`?): {_listed(missing)}"
        )
    if multiple:
        raise ValueError(f"{path}: annotations that pick several classes: {'; '.join(multiple)}")
    unread = [u for u in unread if u]
    if not rows and unread:
        raise ValueError(
            f"{path}: no submitted annotation picks a class under from_name {FROM_NAME!r} (the"
            f" <Choices> of labelwatch's labelling config), so there is nothing to apply:"
            f" {'; '.join(unread)}. Fix it in Label Studio (a <Choices> named {FROM_NAME!r},"
            " as `labelwatch export-label-studio --config-out` writes it; drafts submitted)"
            " and export again."
        )
    return pd.DataFrame(rows, columns=list(DECISION_COLUMNS), dtype=object)


def _unread(task: dict[str, Any], task_id: Any) -> str | None:
    """What a task without a decision holds that read_export does not read, if anything:
    choices under another from_name, or choices only in drafts."""
    others = {
        str(item.get("from_name"))
        for annotation in task.get("annotations") or []
        if not annotation.get("was_cancelled")
        for item in annotation.get("result") or []
        if isinstance(item, dict) and item.get("type") == "choices"
    } - {FROM_NAME}
    if others:
        return f"task {task_id} chooses under from_name {', '.join(map(repr, sorted(others)))}"
    if any(_choices(draft.get("result") or []) for draft in task.get("drafts") or []):
        return f"task {task_id} has choices only in a draft (not submitted)"
    return None


def _choices(result: list[Any]) -> list[str]:
    chosen: list[str] = []
    for item in result:
        if not isinstance(item, dict) or item.get("type") != "choices":
            continue
        if item.get("from_name") != FROM_NAME:
            continue
        chosen.extend(str(c) for c in (item.get("value") or {}).get("choices") or [])
    return chosen
