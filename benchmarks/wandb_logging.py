"""W&B logging in the training process: CPU per epoch with and without W&B's per-cell
conversion, side by side.

LabelWatch logs each epoch on a thread of the training process, and Python there holds
the GIL that training needs. Prints one table, one row per N (rows of the per-sample
table): CPU seconds of the thread that logs one epoch to an offline run (the per-sample
table with audio for ``--media`` rows, the candidates table, metrics and the
``relabel-candidates`` artifact), the median over ``--epochs`` epochs that take turns:
``wandb_s`` with every table cell through W&B's own conversions, ``labelwatch_s`` with
plain cells and rows kept as they are and the artifact's JSON encoded in one go
(``labelwatch.sinks.wandb``: the same files), and ``ratio``.

    python benchmarks/wandb_logging.py
    python benchmarks/wandb_logging.py --sizes 1000 --epochs 6
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from labelwatch import score_predictions
from labelwatch.media import AudioFromPath
from labelwatch.sinks.wandb import WandbSink

CLASSES = [f"class_{i}" for i in range(10)]


def epoch_rows(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """A per-sample table like LabelWatch's: the scores, a map, a path and a few more."""
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(n, len(CLASSES))).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, len(CLASSES), n))
    samples = score_predictions(logits=logits, labels=labels, class_names=CLASSES)
    samples["x"], samples["y"] = rng.random(n) * 10, rng.random(n) * 10
    samples["knn_agreement"] = rng.random(n)
    samples["flag_streak"] = rng.integers(0, 3, n)
    samples["path"] = [f"{i % 50}.wav" for i in range(n)]
    samples["is_candidate"] = samples["is_confident_mismatch"]
    return samples


def one_size(n: int, epochs: int, media_rows: int, folder: Path) -> dict:
    import soundfile
    import wandb

    audio = folder / "audio"
    audio.mkdir(exist_ok=True)
    for i in range(50):  # 2 s clips, as in the urban-sounds example
        soundfile.write(audio / f"{i}.wav", np.zeros(32_000, dtype=np.float32), 16_000)
    rng = np.random.default_rng(0)
    run = wandb.init(project="labelwatch-bench", dir=folder, mode="offline")
    sink = WandbSink(type("Logger", (), {"experiment": run})())
    to_media = AudioFromPath(root=audio)
    times: dict[str, list[float]] = {"wandb_s": [], "labelwatch_s": []}
    for epoch in range(epochs + 2):  # the first two warm up
        samples = epoch_rows(n, rng)
        candidates = samples[samples["is_candidate"]].head(100)
        files = {"candidates.parquet": folder / "c.parquet", "candidates.csv": folder / "c.csv"}
        candidates.to_parquet(files["candidates.parquet"])
        candidates.to_csv(files["candidates.csv"])
        rows = samples.head(media_rows).to_dict("records")
        media = {row["sample_id"]: to_media(row) for row in rows}
        summary = {"epoch": epoch, "num_candidates": len(candidates), "mismatch_rate": 0.5}
        summary |= {"confident_mismatch_rate": 0.3, "mean_entropy": 0.4}
        mode = "labelwatch_s" if epoch % 2 else "wandb_s"
        log = sink.log_epoch if mode == "labelwatch_s" else _with_wandbs_conversion(sink)
        start = time.thread_time()
        log(
            epoch=epoch,
            step=epoch,
            samples=samples,
            candidates=candidates,
            summary=summary,
            files=files,
            media=media,
        )
        if epoch >= 2:
            times[mode].append(time.thread_time() - start)
    run.finish()
    row = {"N": n, **{mode: float(np.median(spent)) for mode, spent in times.items()}}
    return row | {"ratio": row["labelwatch_s"] / row["wandb_s"]}


def _with_wandbs_conversion(sink: WandbSink):
    """`WandbSink.log_epoch` without LabelWatch's plain-cell path."""
    return lambda **kwargs: WandbSink.log_epoch.__wrapped__(sink, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--epochs", type=int, default=8, help="logged epochs, half each way")
    parser.add_argument("--media", type=int, default=150, help="rows with audio")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as folder:
        rows = [one_size(n, args.epochs, args.media, Path(folder)) for n in args.sizes]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
