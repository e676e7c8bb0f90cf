"""The urban-sounds demo end to end: data, training with LabelWatch, and what it found.

``make demo`` runs ``python -m examples.urban_sounds.demo``, which

1. generates the synthetic UrbanSound8K stand-in under ``data/urban_sounds`` when it is
   missing (3000 clips, 2 worker processes);
2. trains the log-mel CNN with LabelWatch through LightningCLI and
   ``configs/urban_sounds.yaml`` (W&B offline);
3. prints where the offline W&B run, the ``relabel-candidates`` artifact and the local
   outputs are, the top relabel candidates, and how good they are against the data's
   ground truth (``metadata/ground_truth.csv``): precision@10, precision over all
   candidates and recall of the corrupted labels. A candidate is right when its label
   was corrupted or when the clip holds a siren other than its annotated class (a
   hidden siren, like a dog bark with a siren behind it).

Quick runs: ``python -m examples.urban_sounds.demo --num-clips 600 --max-epochs 2``
(a different ``--num-clips`` regenerates the synthetic data). Other arguments go to
LightningCLI, for example ``--trainer.callbacks.projection pca``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["evaluate", "main"]

# The repository's config, wherever the demo runs from; data and outputs go under the
# working directory.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "urban_sounds.yaml")
DEFAULT_ROOT = "data/urban_sounds"
# LightningCLI arguments the demo sets itself, and what to use instead.
_OWN_ARGUMENTS = {
    "--data.root": "--root (it also sets where the W&B table plays the clips from)",
    "--data.seed": "python -m examples.urban_sounds.train to train on other synthetic data",
    "--data.generate_clips": "--num-clips",
}
_MARKER = ".labelwatch-synthetic"  # written by examples.urban_sounds.generate


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the numbers it printed and where things are (for tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.urban_sounds.demo",
        allow_abbrev=False,
        description="Train the urban-sounds example with LabelWatch and report what it found."
        " Unknown arguments are passed to LightningCLI (e.g. --trainer.callbacks.projection pca).",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="default: %(default)s")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="data folder (default: %(default)s)")
    parser.add_argument(
        "--num-clips",
        type=int,
        default=3000,
        help="default: %(default)s; another number deletes and regenerates the synthetic"
        " clips under --root",
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--top", type=int, default=10, help="candidates to print")
    args, cli_args = parser.parse_known_args(argv)
    audio = _check_arguments(parser, args, cli_args)
    os.environ.setdefault("WANDB_MODE", "offline")
    began = time.perf_counter()

    _ensure_data(Path(args.root), args.num_clips, args.workers, **audio)
    overrides = [
        "--data.root",
        args.root,
        "--trainer.callbacks.media_fn.init_args.root",
        str(Path(args.root) / "audio"),
    ]
    if args.max_epochs is not None:
        overrides += ["--trainer.max_epochs", str(args.max_epochs)]
    trained = time.perf_counter()
    where = _fit(["fit", "--config", args.config, *overrides, *cli_args])
    trained = time.perf_counter() - trained

    candidates = _load_candidates(where["outputs"])
    samples = pd.read_parquet(where["epoch_dir"] / "samples.parquet")
    truth_path = Path(args.root) / "metadata" / "ground_truth.csv"
    truth = pd.read_csv(truth_path) if truth_path.is_file() else None
    numbers = evaluate(samples, candidates, truth, top=args.top)
    numbers["val_acc"] = where["val_acc"]
    numbers["train_seconds"] = trained
    numbers["total_seconds"] = time.perf_counter() - began
    _report(where, candidates, numbers, args.top)
    return {**where, **numbers}


# --------------------------------------------------------------------------------- steps


def _check_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cli_args: list[str]
) -> None:
    """Refuse, before generating or training anything, what the demo cannot honour;
    returns the clips' length and sample rate given for the data, for the generator."""
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    # --flag=value or --flag value, as LightningCLI takes them
    pairs = [a.split("=", 1) for a in cli_args]
    values = {
        pair[0]: pair[1] if len(pair) == 2 else next(iter(cli_args[i + 1 : i + 2]), "")
        for i, pair in enumerate(pairs)
        if pair[0].startswith("--")
    }
    for flag, instead in _OWN_ARGUMENTS.items():
        if flag in values:
            parser.error(f"{flag}: the demo sets it; use {instead}")
    for flag in ("--trainer.strategy", "--trainer.devices", "--trainer.num_nodes"):
        value = values.get(flag)
        if value is not None and value not in ("", "1", "auto", "single_device", "[0]"):
            parser.error(
                f"{flag} {value}: the demo trains and reports in one process; for DDP run"
                " python -m examples.urban_sounds.train fit --config configs/urban_sounds.yaml"
            )
    audio: dict[str, Any] = {}
    for name, kind in (("clip_seconds", float), ("sample_rate", int)):
        if f"--data.{name}" in values:
            try:
                audio[name] = kind(values[f"--data.{name}"])
            except ValueError:
                parser.error(f"--data.{name} {values[f'--data.{name}']!r}: not a {kind.__name__}")
    return audio


def _ensure_data(root: Path, num_clips: int, workers: int, **audio: Any) -> None:
    """Generate the synthetic data when missing, or when ``num_clips`` changed (``audio``:
    the clips' ``clip_seconds`` and ``sample_rate``, when given)."""
    metadata = root / "metadata" / "UrbanSound8K.csv"
    if metadata.is_file():
        synthetic = (root / _MARKER).is_file()
        with metadata.open() as lines:
            existing = sum(1 for _ in lines) - 1
        if not synthetic or existing == num_clips:
            kind = "synthetic" if synthetic else "UrbanSound8K"
            print(f"data: {existing} {kind} clips in {root}")
            return
    from examples.urban_sounds.generate import generate

    print(f"data: generating {num_clips} synthetic clips in {root} ({workers} workers) ...")
    start = time.perf_counter()
    generate(root, num_clips=num_clips, workers=workers, **audio)
    print(f"data: done in {time.perf_counter() - start:.1f} s")


def _fit(cli_args: list[str]) -> dict[str, Any]:
    """Train through LightningCLI; where the run, artifact and outputs went."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from examples.urban_sounds.train import main as train
    from labelwatch import LabelWatch

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both
    try:
        cli = train(cli_args)
    finally:
        sys.argv = argv
    trainer = cli.trainer
    watch = next(c for c in trainer.callbacks if isinstance(c, LabelWatch))
    if watch.last_output_dir is None:
        raise SystemExit("LabelWatch wrote no outputs: did validation run?")
    metric = trainer.callback_metrics.get("val_acc")
    where: dict[str, Any] = {
        "epoch_dir": watch.last_output_dir,
        "outputs": watch.last_output_dir.parent,
        "epoch": watch.last_epoch,
        "val_acc": float(metric) if metric is not None else float("nan"),
        "run_dir": None,
    }
    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is not None:
        run = logger.experiment
        where["run_dir"] = Path(run.settings.sync_dir)
        where["run_id"] = run.id
        # finish() returns before the W&B service has written the run's .wandb log;
        # teardown() waits for it, so the run can be read or synced at once.
        wandb.finish()
        wandb.teardown()
    return where


def _load_candidates(outputs: Path) -> pd.DataFrame:
    from labelwatch import load_candidates

    return load_candidates(outputs)


def evaluate(
    samples: pd.DataFrame,
    candidates: pd.DataFrame,
    truth: pd.DataFrame | None,
    *,
    top: int = 10,
) -> dict[str, Any]:
    """Candidate quality against ``ground_truth.csv`` (None: counts only).

    A candidate is right when its label was corrupted or its clip holds a hidden siren
    (a siren that is not the annotated class). Recall is over the corrupted labels of
    the scored (validation) clips.
    """
    numbers: dict[str, Any] = {
        "num_samples": len(samples),
        "num_candidates": len(candidates),
        "mismatch_rate": float(samples["is_mismatch"].mean()) if len(samples) else float("nan"),
    }
    if truth is None:
        return numbers
    truth = truth.set_index("slice_file_name")
    hidden_siren = truth["contains_siren"].astype(bool) & (truth["annotated_class"] != "siren")
    right = truth["is_corrupted"].astype(bool) | hidden_siren
    dog_siren = (truth["annotated_class"] == "dog_bark") & truth["contains_siren"].astype(bool)

    scored = truth.loc[samples["sample_id"].astype(str)]
    ids = candidates["sample_id"].astype(str)
    hits = right.loc[ids].to_numpy()
    corrupted = scored.index[scored["is_corrupted"].astype(bool)]
    found = set(ids)

    def share(values: Any) -> float:
        return float(values.mean()) if len(values) else float("nan")

    predicted = samples.set_index(samples["sample_id"].astype(str))["predicted_label"]
    numbers.update(
        {
            "precision_at_top": share(hits[:top]),
            "top": min(top, len(hits)),
            "precision_at_candidates": share(hits),
            "num_right": int(hits.sum()),
            "num_corrupted": len(corrupted),
            "num_corrupted_found": sum(1 for i in corrupted if i in found),
            "recall_corrupted": share(pd.Series([i in found for i in corrupted], dtype=float)),
            "num_hidden_sirens": int(hidden_siren.loc[scored.index].sum()),
            "num_hidden_sirens_found": int(hidden_siren.loc[ids].sum()),
            "num_dog_siren": int(dog_siren.loc[scored.index].sum()),
            "num_dog_siren_found": int(dog_siren.loc[ids].sum()),
            "accuracy_vs_truth": share(
                predicted.loc[scored.index].to_numpy() == scored["true_classID"].to_numpy()
            ),
        }
    )
    if "is_watch_candidate" in candidates.columns:  # the config watches sirens
        watched = candidates["is_watch_candidate"].astype(bool).to_numpy()
        numbers.update(
            {
                "num_watch_flagged": int(watched.sum()),
                "num_watch_right": int(hits[watched].sum()),
                "num_watch_hidden_sirens": int(hidden_siren.loc[ids[watched]].sum()),
            }
        )
    return numbers


def _report(where: dict[str, Any], candidates: pd.DataFrame, n: dict[str, Any], top: int) -> None:
    from labelwatch.candidates import first_watch_column, leaning, watch_columns
    from labelwatch.sinks.wandb import artifact_name

    rule = "-" * 78
    print(
        f"\n{rule}\nlabelwatch urban-sounds demo: done in {n['total_seconds']:.0f} s"
        f" (fit {n['train_seconds']:.0f} s)\n{rule}"
    )
    outputs = where["outputs"]
    print(f"local outputs:   {outputs}  (latest: {where['epoch_dir'].name})")
    run_dir = where["run_dir"]
    if run_dir is not None:
        import wandb

        staging = Path(wandb.env.get_data_dir()) / "artifacts" / "staging"
        print(f"W&B offline run: {run_dir}")
        print(
            f"W&B artifact:    {artifact_name(where['run_id'])}"
            f" (type relabel-candidates, aliases latest, epoch-{where['epoch']});"
            f" files staged under {staging}"
        )
    else:
        print("W&B: no WandbLogger in the config, nothing logged to W&B")

    shown = ["rank", "sample_id", "given_name", "suggested_name", "confidence", "entropy"]
    print(f"\ntop {min(top, len(candidates))} of {len(candidates)} relabel candidates:")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        head = candidates[[c for c in shown if c in candidates.columns]].head(top)
        print(head.to_string(index=False) if len(head) else "  (none)")

        # Each watched class's own ranking (by label_quality its candidates come last).
        for name, column in watch_columns(candidates.columns).items():
            flagged = candidates[candidates["is_watch_candidate"]]
            furthest = flagged.loc[leaning(flagged, name).nlargest(top // 2).index]
            print(f"\ntop {len(furthest)} candidates leaning toward {name}:")
            wanted = [*shown, column, first_watch_column(name)]
            columns = [c for c in wanted if c in furthest.columns]
            print(furthest[columns].to_string(index=False) if len(furthest) else "  (none)")

    print(f"\nvalidation accuracy (annotated labels): {n['val_acc']:.3f}")
    if "precision_at_candidates" not in n:
        print("no metadata/ground_truth.csv: candidate precision and recall not computed")
    else:
        print(f"validation accuracy (true labels):      {n['accuracy_vs_truth']:.3f}")
        print(
            f"precision@{n['top']}: {n['precision_at_top']:.2f}    "
            f"precision@candidates: {n['precision_at_candidates']:.2f}"
            f" ({n['num_right']} of {n['num_candidates']} candidates are corrupted labels"
            " or hidden sirens)"
        )
        print(
            f"recall of corrupted labels: {n['recall_corrupted']:.2f}"
            f" ({n['num_corrupted_found']} of {n['num_corrupted']} corrupted labels in the"
            f" {n['num_samples']} validation clips are candidates)"
        )
        print(
            f"hidden sirens among the candidates: {n['num_hidden_sirens_found']} of"
            f" {n['num_hidden_sirens']}; dog barks hiding a siren: {n['num_dog_siren_found']}"
            f" of {n['num_dog_siren']}"
        )
        if "num_watch_flagged" in n:
            print(
                f"watching sirens: {n['num_watch_flagged']} candidates lean toward siren"
                f" (watch_siren >= 3, now or in the first epoch), {n['num_watch_right']} of them"
                f" corrupted labels or hidden sirens; {n['num_watch_hidden_sirens']} hidden"
                " sirens among them"
            )

    print("\nnext:")
    if run_dir is not None:
        print(f"  wandb sync {run_dir}    # upload the run and the artifact (needs a login)")
    print(f"  labelwatch candidates {outputs} --top 20 -o review.csv")
    for name in watch_columns(candidates.columns):
        print(f"  labelwatch candidates {outputs} --leaning {name} -o {name}.csv")


if __name__ == "__main__":
    main(sys.argv[1:])
