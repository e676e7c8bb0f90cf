"""The `labelwatch` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from labelwatch.candidates import load_candidates, to_csv_safe
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="labelwatch", description="Review the label errors LabelWatch found."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser(
        "candidates",
        help="print the top relabel candidates and write them to a file",
        description="SOURCE: a local outputs folder, a local W&B run folder, or a W&B artifact"
        " reference entity/project/relabel-candidates-<run id>:alias (needs W&B online).",
    )
    show.add_argument("source")
    show.add_argument("--epoch", type=int, default=None, help="epoch to read (default: latest)")
    show.add_argument("--top", type=int, default=None, metavar="K", help="keep the top K")
    show.add_argument("-o", "--output", type=Path, help="write the candidates here (.csv)")
    args = parser.parse_args(argv)
    try:
        return _candidates(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"labelwatch: error: {err}", file=sys.stderr)
        return 2


def _candidates(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    frame = load_candidates(args.source, epoch=args.epoch)
    if args.top is not None:
        frame = frame.head(args.top)
    shown = [c for c in _SHOWN_COLUMNS if c in frame.columns]
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(frame[shown].to_string(index=False) if len(frame) else "no candidates")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output, lambda p: to_csv_safe(frame).to_csv(p, index=False))
        print(f"wrote {len(frame)} candidates to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
