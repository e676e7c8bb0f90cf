"""LabelWatch at scale: capture overhead, epoch-end time, peak memory, W&B table cost.

Prints one table, one row per (N samples, C classes) with D = 512 embeddings:

- ``loop_s`` / ``loop_lw_s``: validation-loop time of a real ``Trainer`` without and with
  LabelWatch (first batch start to last batch end, best of ``--repeats``); ``overhead``
  is their ratio (target <= 1.03). The model is a cheap 2-layer head on precomputed
  512-d features, the worst case for relative overhead.
- ``score_s``: ``score_predictions`` on the N x C logits (target: 100k x 1000 <= 2 s);
  ``epoch_end_s``: LabelWatch's whole epoch end without W&B (gather, score, parquet files).
- ``peak_mem``: peak resident memory added by capture + collect + scoring, in a fresh
  process, over the raw tensors N x (C + D) x 4 bytes (target <= 1.5); ``peak_mem_f16``
  the same with ``embeddings_dtype="float16"``.
- ``table_build_s`` / ``table_log_s``: building the per-sample ``wandb.Table`` and logging
  it to an offline run (depends on N only; measured at C = 10).

    python benchmarks/scale.py                      # the full grid (about 5 minutes on 2 cores)
    python benchmarks/scale.py --sizes 10000 --classes 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

D = 512
BATCH = 1024


class Features:
    """Precomputed features and labels, served a whole batch at a time by `_loader`."""

    def __init__(self, n: int, c: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, D, generator=generator)
        self.y = torch.randint(0, c, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)


def _loader(data: Features) -> DataLoader:
    # Whole batches by slicing, so data loading does not dominate the loop being timed.
    batches = [range(i, min(i + BATCH, len(data))) for i in range(0, len(data), BATCH)]

    def fetch(index: range) -> dict:
        sl = slice(index.start, index.stop)
        return {"x": data.x[sl], "target": data.y[sl], "sample_id": torch.arange(sl.start, sl.stop)}

    return DataLoader(batches, batch_size=None, collate_fn=fetch)


def _model(c: int):
    from lightning.pytorch import LightningModule

    class Head(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(D, D), nn.ReLU())
            self.head = nn.Linear(D, c)

        def training_step(self, batch: dict, _: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.head(self.embed(batch["x"])), batch["target"])

        def validation_step(self, batch: dict, _: int) -> dict:
            embeddings = self.embed(batch["x"])
            return {"logits": self.head(embeddings), "embeddings": embeddings}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Head()


def _timed_fit(n: int, c: int, with_labelwatch: bool, out: Path) -> tuple[float, float]:
    from lightning.pytorch import Callback, Trainer

    from labelwatch import LabelWatch

    class Clock(Callback):
        def on_validation_epoch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_validation_batch_end(self, *args, **kwargs) -> None:
            self.last_batch = time.perf_counter()

        def on_validation_epoch_end(self, *args) -> None:
            self.end = time.perf_counter()

    clock = Clock()
    callbacks = [LabelWatch(projection="none", dirpath=out)] if with_labelwatch else []
    data = Features(n, c)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, clock],  # the clock's hooks run after LabelWatch's
    )
    trainer.fit(_model(c), _loader(data), _loader(data))
    return clock.last_batch - clock.start, clock.end - clock.last_batch


def _scoring_time(n: int, c: int) -> float:
    from labelwatch import score_predictions

    logits = torch.randn(n, c, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, c, (n,))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        score_predictions(logits=logits, labels=labels)
        best = min(best, time.perf_counter() - start)
    return best


MEMORY_PROBE = """
import sys, threading, time, torch
from labelwatch.capture import EpochBuffer, merge_ranks
from labelwatch.scoring import score_predictions
n, c, d, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
page = __import__("os").sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
g = torch.Generator().manual_seed(0)
torch.randn(8, 8)  # warm up allocators before the baseline
base = rss()
threading.Thread(target=watch, daemon=True).start()
buffer = EpochBuffer(expected_rows=-(-n // 1024) * 1024,  # as LabelWatch sizes it
                      embeddings_dtype=torch.float16 if dtype == "float16" else None)
for start in range(0, n, 1024):
    b = min(1024, n - start)
    buffer.add(torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g),
               torch.arange(start, start + b), embeddings=torch.randn(b, d, generator=g))
captured = merge_ranks(buffer.collect()).to_host()
frame = score_predictions(logits=captured.logits, labels=captured.targets,
                          sample_ids=captured.sample_ids)
time.sleep(0.05)
print((max(peak[0], rss()) - base) / (n * (c + d) * 4))
"""


def _peak_memory_ratio(n: int, c: int, dtype: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(n), str(c), str(D), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _wandb_table_times(n: int) -> tuple[float, float, int]:
    import wandb

    from labelwatch import score_predictions
    from labelwatch.sinks.wandb import _table

    frame = score_predictions(logits=torch.randn(n, 10), labels=torch.randint(0, 10, (n,)))
    with tempfile.TemporaryDirectory() as tmp:
        run = wandb.init(project="labelwatch-bench", dir=tmp, mode="offline")
        start = time.perf_counter()
        table = _table(frame, None)
        built = time.perf_counter()
        run.log({"labelwatch/samples": table})
        logged = time.perf_counter()
        run.finish()
        (path,) = Path(tmp).glob("wandb/offline-run-*/files/media/table/**/*.table.json")
        rows = len(json.loads(path.read_text())["data"])
    return built - start, logged - built, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)

    rows = []
    table_cost: dict[int, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for c in args.classes:
                without, with_lw, epoch_end = [], [], []
                for _ in range(args.repeats):  # alternate, so drift hits both alike
                    without.append(_timed_fit(n, c, False, Path(tmp))[0])
                    loop, end = _timed_fit(n, c, True, Path(tmp))
                    with_lw.append(loop)
                    epoch_end.append(end)
                if n not in table_cost:
                    table_cost[n] = _wandb_table_times(n)
                build, log, logged_rows = table_cost[n]
                rows.append(
                    {
                        "N": n,
                        "C": c,
                        "loop_s": min(without),
                        "loop_lw_s": min(with_lw),
                        "overhead": min(with_lw) / min(without),
                        "score_s": _scoring_time(n, c),
                        "epoch_end_s": min(epoch_end),
                        "peak_mem": _peak_memory_ratio(n, c, "float32"),
                        "peak_mem_f16": _peak_memory_ratio(n, c, "float16"),
                        "table_build_s": build,
                        "table_log_s": log,
                        "table_rows_written": logged_rows,
                    }
                )
                print(f"done N={n} C={c}", file=sys.stderr, flush=True)
    print(f"torch threads: {torch.get_num_threads()}, D = {D}, batch = {BATCH}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
