"""The `labelwatch` command line.

- ``labelwatch candidates SOURCE [--epoch N] [--top K] [--leaning CLASS] [-o FILE]
  [--format csv|parquet|json]``
- ``labelwatch export-label-studio SOURCE --data-template URL -o tasks.json [--media ...]``
- ``labelwatch apply --labels labels.csv --decisions FILE -o corrected.csv [--audit ...]``

Errors (bad sources, refused decisions, an output that is an input) print one
``labelwatch: error: ...`` message and exit with status 2. Output piped into a reader
that stops early (``| head``) ends quietly with status 141, as Unix tools do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from labelwatch.candidates import (
    TABLE_FORMATS,
    CandidateSet,
    first_watch_column,
    leaning,
    read_candidates,
    records_json,
    refuse_input_overwrite,
    save_csv,
    to_csv_safe,
    watch_column,
    watch_columns,
    write_table,
)
from labelwatch.sinks.local import write_atomic

_SHOWN_COLUMNS = (
    "rank",
    "sample_id",
    "given_name",
    "suggested_name",
    "confidence",
    "entropy",
    "label_quality",
)
_SOURCE_HELP = (
    "SOURCE: a local outputs folder (<log dir>/labelwatch), an offline or online W&B run"
    " folder (wandb/offline-run-*), or a W&B artifact reference"
    " entity/project/relabel-candidates-<run id>:alias, which is downloaded through the W&B"
    " API and so needs an online W&B and a login."
)
_SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a reader that stopped (`| head`) shows here, not at exit
        return code
    except BrokenPipeError:
        # Exit quietly as Unix tools do; stdout goes to devnull so the flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # the status of a tool that SIGPIPE stopped
    except (FileNotFoundError, ValueError) as err:
        print(f"labelwatch: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelwatch", description="Review the label errors LabelWatch found."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser(
        "candidates",
        help="print the top relabel candidates and write them to a file",
        description="Print the top relabel candidates and write them for review. The written"
        " file adds a `run` column (W&B run id or outputs folder) and, as CSV, an empty"
        " `decision` column for the reviewer (accept, reject or a class name), ready for"
        f" `labelwatch apply`. {_SOURCE_HELP}",
    )
    _source_arguments(show)
    show.add_argument(
        "-o", "--output", type=Path, help="write the candidates here (- for standard output)"
    )
    show.add_argument(
        "--format",
        choices=TABLE_FORMATS,
        default=None,
        help="file format (default: from the -o suffix, else csv); CSV cells that a"
        " spreadsheet would evaluate are quoted",
    )
    show.set_defaults(run=_candidates)

    export = commands.add_parser(
        "export-label-studio",
        help="write the candidates as Label Studio tasks with the suggested label",
        description="Write Label Studio import tasks (a JSON list): per candidate its media"
        " URL, sample id, scores and metadata, and a prediction holding the suggested label"
        " (scored with the model's probability when it is the model's own prediction), which"
        " the reviewer submits or changes. Import them into a project"
        " whose labelling config is --config-out. Then export the project as JSON and run"
        f" `labelwatch apply`. {_SOURCE_HELP}",
    )
    _source_arguments(export)
    export.add_argument(
        "--data-template",
        required=True,
        metavar="URL",
        help="media URL with {column} placeholders filled from each candidate, e.g."
        " 'https://host/audio/{path}' or '/data/local-files/?d=audio/{path}'; values are"
        " URL-quoted per path segment and may not be absolute or contain '..'",
    )
    export.add_argument("-o", "--output", type=Path, required=True, help="tasks JSON to write")
    export.add_argument(
        "--media",
        choices=("audio", "image"),
        default="audio",
        help="the media tag of the tasks and config (default: audio)",
    )
    export.add_argument(
        "--config-out", type=Path, help="also write the matching labelling config (XML) here"
    )
    export.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="the classes (default: from the candidates' summary)",
    )
    export.add_argument("--model-version", help="prediction model_version (default: run + epoch)")
    export.set_defaults(run=_export_label_studio)

    apply = commands.add_parser(
        "apply",
        help="apply reviewed decisions to a label file: corrected labels and an audit",
        description="Apply decisions to a labels CSV (sample_id + a label column of class"
        " names, or of class indices when the class names are known). DECISIONS is a"
        " reviewed candidates CSV with a `decision` column (accept = take suggested_name,"
        " reject = keep, a class name = relabel, blank = no decision) or a Label Studio JSON"
        " export (each non-cancelled annotation is a decision; annotations of one task that"
        " disagree conflict, unless exactly one is marked ground truth, which is then the"
        " decision). Refuses unknown sample ids,"
        " unknown class names and conflicting decisions (listing them all), and any output"
        " that is an input or lies in the --candidates outputs folder. Writes corrected.csv"
        " in the labels file's form (separator, byte-order mark, line ends, header row),"
        " atomically.",
    )
    apply.add_argument("--labels", type=Path, required=True, help="the labels CSV to correct")
    apply.add_argument(
        "--decisions",
        type=Path,
        required=True,
        action="append",
        metavar="DECISIONS",
        help="reviewed candidates .csv or Label Studio export .json (repeatable)",
    )
    apply.add_argument("-o", "--output", type=Path, required=True, help="corrected labels CSV")
    apply.add_argument(
        "--audit", type=Path, help="audit CSV (default: <output stem>.audit.csv beside -o)"
    )
    apply.add_argument("--label-column", default="label", help="label column (default: label)")
    apply.add_argument(
        "--id-column",
        default="sample_id",
        help="column of the sample ids (default: sample_id; slice_file_name for UrbanSound8K)",
    )
    apply.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="the valid classes in index order (default: from --candidates, else the labels"
        " present in --labels)",
    )
    apply.add_argument(
        "--candidates",
        metavar="SOURCE",
        help="the candidates the review was made on: class names, run, epoch, suggested"
        " labels for `accept` rows without them, and the artifact for --log-wandb",
    )
    apply.add_argument("--epoch", type=int, default=None, help="epoch of --candidates")
    apply.add_argument(
        "--log-wandb",
        metavar="ENTITY/PROJECT",
        help="also log the corrected labels and audit as a `label-corrections` artifact in a"
        " new run (job_type=relabel) that uses the candidates artifact as its input, so W&B"
        " shows the lineage. Needs an online W&B and a login; refused when offline",
    )
    apply.add_argument(
        "--candidates-artifact",
        metavar="REF",
        help="the candidates artifact for --log-wandb (default: from --candidates, or"
        " ENTITY/PROJECT/relabel-candidates-<run>:epoch-<n> from the decisions' run and epoch)",
    )
    apply.set_defaults(run=_apply)
    return parser


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("--epoch", type=int, default=None, help="epoch to read (default: latest)")
    parser.add_argument("--top", type=int, default=None, metavar="K", help="keep the top K")
    parser.add_argument(
        "--leaning",
        metavar="CLASS",
        help="only the candidates a watched class flagged (LabelWatch(watch_classes=...)),"
        " those leaning furthest toward CLASS (now or in their first validation) first",
    )


def _read_source(args: argparse.Namespace) -> CandidateSet:
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    found = read_candidates(args.source, epoch=args.epoch)
    frame = found.frame
    if args.leaning is not None:
        column = watch_column(args.leaning)
        if column not in frame.columns:
            watched = list(watch_columns(frame.columns))
            raise ValueError(
                f"--leaning {args.leaning}: the run did not watch that class (watched:"
                f" {watched or 'none'}); LabelWatch(watch_classes=[...]) sets what is watched"
            )
        frame = frame[frame["is_watch_candidate"].astype(bool)]
        order = leaning(frame, args.leaning).sort_values(ascending=False, kind="stable")
        frame = frame.loc[order.index]
    if args.top is not None:
        frame = frame.head(args.top)
    return replace(found, frame=frame)


# ----------------------------------------------------------------------------- candidates
def _candidates(args: argparse.Namespace) -> int:
    if args.format is not None and args.output is None:
        raise ValueError("--format needs -o/--output")
    to_stdout = args.output is not None and str(args.output) == "-"
    fmt = None
    if args.output is not None:
        fmt = args.format or _SUFFIX_FORMATS.get(args.output.suffix.lower(), "csv")
        if to_stdout and fmt == "parquet":
            raise ValueError("parquet cannot go to standard output: give -o a file name")
    found = _read_source(args)
    frame = found.frame
    if args.output is not None and not to_stdout:
        refuse_input_overwrite(args.output, found.inputs)
    shown = [c for c in _SHOWN_COLUMNS if c in frame.columns]
    if args.leaning is not None:
        columns = (watch_column(args.leaning), first_watch_column(args.leaning))
        shown += [c for c in columns if c in frame.columns]
    out = frame.copy()
    if found.run is not None and "run" not in out:
        out["run"] = found.run
    if fmt == "csv" and "decision" not in out:
        out["decision"] = ""
    if args.output is not None and not to_stdout:  # first: a closed stdout cannot stop it
        write_table(out, args.output, fmt)
    if not to_stdout:  # with -o -, standard output carries the table itself
        with pd.option_context("display.width", 160):
            table = frame[shown].to_string(index=False, max_colwidth=40)
        print(table if len(frame) else "no candidates")
    if to_stdout:
        if fmt == "csv":
            save_csv(to_csv_safe(out), sys.stdout)
        else:
            sys.stdout.write(records_json(out))
        print(f"wrote {len(frame)} candidates to standard output", file=sys.stderr)
    elif args.output is not None:
        print(f"wrote {len(frame)} candidates to {args.output}")
    return 0


# ----------------------------------------------------------------------------- Label Studio
def _export_label_studio(args: argparse.Namespace) -> int:
    from labelwatch.labelstudio import labeling_config, to_tasks

    found = _read_source(args)
    for path in filter(None, (args.output, args.config_out)):
        refuse_input_overwrite(path, found.inputs)
    if args.config_out is not None and args.config_out.resolve() == args.output.resolve():
        raise ValueError("-o and --config-out must be different files")
    class_names = args.class_names or found.class_names
    if args.config_out is not None and not class_names:
        raise ValueError(
            "the class names are unknown for this source; pass --class-names for --config-out"
        )
    tasks = to_tasks(
        found, data_template=args.data_template, media=args.media, model_version=args.model_version
    )
    if class_names:
        unknown = sorted({t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks})
        unknown = [n for n in unknown if n not in class_names]
        if unknown:
            raise ValueError(f"suggested labels {unknown} are not in the class names {class_names}")
    text = json.dumps(tasks, indent=2, ensure_ascii=False, allow_nan=False)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))
    print(f"wrote {len(tasks)} Label Studio tasks to {args.output}")
    if args.config_out is not None:
        config = labeling_config(class_names, args.media)
        args.config_out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.config_out, lambda p: Path(p).write_text(config, encoding="utf-8"))
        print(f"wrote the labelling config to {args.config_out}")
    return 0


# ----------------------------------------------------------------------------- apply
def _apply(args: argparse.Namespace) -> int:
    from labelwatch import relabel

    audit_path = args.audit or args.output.with_name(f"{args.output.stem}.audit.csv")
    found = read_candidates(args.candidates, epoch=args.epoch) if args.candidates else None
    inputs = [args.labels, *args.decisions, *(found.inputs if found else ())]
    for path in (args.output, audit_path):
        refuse_input_overwrite(path, inputs)
    if args.output.resolve() == audit_path.resolve():
        raise ValueError("-o and --audit must be different files")
    if args.log_wandb is not None and args.log_wandb.count("/") != 1:
        raise ValueError(f"--log-wandb must be ENTITY/PROJECT, got {args.log_wandb!r}")

    labels = relabel.read_labels(
        args.labels, label_column=args.label_column, id_column=args.id_column
    )
    decisions = [relabel.read_decisions(path) for path in args.decisions]
    corrected, audit = relabel.apply_decisions(
        labels,
        decisions,
        class_names=args.class_names or (found.class_names if found else None),
        label_column=args.label_column,
        candidates=found.frame if found else None,
        epoch=found.epoch if found else None,
        run=found.run if found else None,
    )
    artifact = None
    if args.log_wandb is not None:
        artifact = _candidates_artifact(args, found, audit)
        relabel.check_wandb_online()  # before writing: a refusal leaves nothing behind
    relabel.write_corrections(corrected, audit, args.output, audit_path)
    changed = int(audit["changed"].sum())
    print(
        f"applied {len(audit)} decisions: {changed} labels changed, {len(audit) - changed} kept;"
        f" wrote {args.output} and the audit {audit_path}"
    )
    if args.log_wandb is not None:
        try:
            url = relabel.log_corrections_to_wandb(
                args.output,
                audit_path,
                project=args.log_wandb,
                candidates_artifact=artifact,
                metadata={"num_decisions": len(audit), "num_changed": changed},
            )
        except Exception as err:  # the local files are written either way
            print(
                f"labelwatch: error: logging to W&B failed ({type(err).__name__}: {err}); the"
                f" corrected labels and audit are written locally",
                file=sys.stderr,
            )
            return 1
        print(f"logged the label-corrections artifact in {url}")
    return 0


def _candidates_artifact(
    args: argparse.Namespace, found: CandidateSet | None, audit: pd.DataFrame
) -> str:
    """The full reference of the candidates artifact the corrections derive from."""
    entity, project = args.log_wandb.split("/")
    reference = args.candidates_artifact or (found.artifact if found else None)
    if reference is None:
        runs = {r for r in audit["run"] if r} if len(audit) else set()
        epochs = {e for e in audit["epoch"] if e} if len(audit) else set()
        if len(runs) == 1 and len(epochs) == 1 and "/" not in next(iter(runs)):
            reference = f"relabel-candidates-{runs.pop()}:epoch-{epochs.pop()}"
    if reference is None:
        raise ValueError(
            "--log-wandb needs the candidates artifact: pass --candidates-artifact"
            " entity/project/relabel-candidates-<run id>:epoch-<n> (or --candidates)"
        )
    parts = reference.split("/")
    if len(parts) == 1:
        return f"{entity}/{project}/{reference}"
    if len(parts) == 2:
        return f"{entity}/{reference}"
    return reference


if __name__ == "__main__":
    sys.exit(main())
