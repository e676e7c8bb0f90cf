"""LabelWatch at scale: capture overhead, epoch-end time, peak memory, W&B table cost.

Prints one table, one row per (model, N samples, C classes) with D = 512 embeddings:

- ``loop_s`` / ``loop_lw_s``: validation-loop time of a real ``Trainer`` without and with
  LabelWatch, from the first ``on_validation_epoch_start`` hook (before LabelWatch's) to
  the end of the last batch, best over ``--repeats`` fits of ``--epochs`` validation
  epochs. ``overhead`` is their ratio in the steady state (epochs after the first; target
  <= 1.03), ``overhead_first`` the first epoch's (capture memory is fresh then), and
  ``overhead_fresh`` the steady state when the capture slabs are not kept between epochs
  (how LabelWatch captured before: every epoch pays the page faults of fresh memory).
  ``overhead_cpu`` / ``overhead_fresh_cpu``: the same ratios of process CPU time, steadier
  than wall time when other work shares the cores. ``overhead_copy``: the overhead that
  the capture alone implies, ``1 + capture_s / loop_s``, where ``capture_s`` is
  ``EpochBuffer.add`` of the epoch's batches timed outside a Trainer (copying each batch's
  logits and embeddings into memory kept from the last epoch); LabelWatch cannot go below
  it without storing less; ``overhead_copy_f16`` the same with ``embeddings_dtype`` and
  ``logits_dtype`` set to ``"float16"`` (half the bytes to write).
  Models: ``head``, a 2-layer head on precomputed 512-d features (about 5 ms a batch of
  1024 at C = 10 on 2 cores, 12 ms at C = 1000: the worst case for relative overhead);
  ``mlp``, a wider 4-layer MLP (a validation step that costs more, as real models do).
- ``score_s``: ``score_predictions`` on the N x C logits; ``scoring_lw_s``: all of
  LabelWatch's scoring at epoch end in the steady state (those scores, kNN agreement, the
  epoch history and the candidate rule; target: 100k x 1000 <= 2 s); ``epoch_end_s``: its
  whole epoch end without W&B (gather, scoring, local files, and the history file that a
  background thread writes while training goes on; the loops are timed from when it is
  written, as one training batch is not enough time for it here).
- ``peak_mem``: peak resident memory added during a real 2-epoch fit with LabelWatch
  (``projection="none"``) from the first validation epoch on: capture, gather, scoring,
  the epoch history (``history_window=3`` and ``history_top_k=10``: for each sample the 2
  past epochs' 10 largest probabilities, their classes and the rest, 0.03 x raw at C =
  1000; whole probability vectors would take 1.33 x) and the local files, in a fresh process, over
  the raw tensors N x (C + D) x 4 bytes (target <= 1.5);
  ``peak_mem_f16`` the same with ``logits_dtype``, ``embeddings_dtype`` and
  ``history_dtype`` set to ``"float16"``. ``peak_mem_marginal`` / ``peak_mem_f16_marginal``:
  the memory each extra sample adds, over its raw tensors, from the next smaller N at the
  same C. The fixed costs that ``peak_mem`` also counts (libraries first loaded at the
  first epoch end, such as pandas and pyarrow) cancel out there.
- ``table_build_s`` / ``table_log_s``: building the per-sample ``wandb.Table`` and logging
  it to an offline run as LabelWatch does (depends on N only; measured at C = 10).

Timings on a shared machine are noisy: compare columns of one run, not runs.

    python benchmarks/scale.py                      # the full grid (about 10 minutes on 2 cores)
    python benchmarks/scale.py --sizes 10000 --classes 10 --models head
    python benchmarks/scale.py --sizes 100000 --classes 10 --models head --no-memory --string-ids

``--string-ids`` gives the samples file names as ids (strings, as the urban-sounds example
has) instead of integers, for the loops and epoch ends.
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


def _loader(data: Features, string_ids: bool = False) -> DataLoader:
    # Whole batches by slicing, so data loading does not dominate the loop being timed.
    batches = [range(i, min(i + BATCH, len(data))) for i in range(0, len(data), BATCH)]
    names = [f"clips/fold{i % 10}/{i}-0-0.wav" for i in range(len(data))] if string_ids else []

    def fetch(index: range) -> dict:
        sl = slice(index.start, index.stop)
        ids = names[sl] if string_ids else torch.arange(sl.start, sl.stop)
        return {"x": data.x[sl], "target": data.y[sl], "sample_id": ids}

    return DataLoader(batches, batch_size=None, collate_fn=fetch)


def _model(c: int, kind: str = "head"):
    from lightning.pytorch import LightningModule

    width = {"head": D, "mlp": 2048}[kind]

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if kind == "head":
                self.embed = nn.Sequential(nn.Linear(D, D), nn.ReLU())
            else:
                self.embed = nn.Sequential(
                    nn.Linear(D, width), nn.ReLU(),
                    nn.Linear(width, width), nn.ReLU(),
                    nn.Linear(width, width), nn.ReLU(),
                    nn.Linear(width, D), nn.ReLU(),
                )  # fmt: skip
            self.head = nn.Linear(D, c)

        def training_step(self, batch: dict, _: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.head(self.embed(batch["x"])), batch["target"])

        def validation_step(self, batch: dict, _: int) -> dict:
            embeddings = self.embed(batch["x"])
            return {"logits": self.head(embeddings), "embeddings": embeddings}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Net()


def _timed_fit(
    n: int, c: int, variant: str, out: Path, epochs: int, model: str, string_ids: bool = False
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per validation epoch: loop seconds, loop CPU seconds, epoch-end seconds (background
    work included) and scoring seconds (LabelWatch's only). variant: none, lw, lw_fresh.

    One training batch separates validation epochs here; in real training the epoch's
    history file is written on its thread meanwhile. So each loop is timed from when that
    write is done, and the wait is counted in the epoch end it belongs to."""
    from lightning.pytorch import Callback, Trainer

    from labelwatch import LabelWatch

    class Start(Callback):  # runs before LabelWatch's hooks
        def __init__(self) -> None:
            self.waits: list[float] = []

        def on_validation_epoch_start(self, *args) -> None:
            begin = time.perf_counter()
            for watcher in watchers:
                watcher._wait_for_history_saves()
            self.waits.append(time.perf_counter() - begin)
            self.start = time.perf_counter()
            self.start_cpu = time.process_time()

    class End(Callback):  # runs after LabelWatch's hooks
        def __init__(self) -> None:
            self.loops: list[float] = []
            self.loops_cpu: list[float] = []
            self.ends: list[float] = []
            self.scoring: list[float] = []

        def on_validation_batch_end(self, *args, **kwargs) -> None:
            self.last_batch = time.perf_counter()
            self.last_batch_cpu = time.process_time()

        def on_validation_epoch_end(self, *args) -> None:
            self.loops.append(self.last_batch - start.start)
            self.loops_cpu.append(self.last_batch_cpu - start.start_cpu)
            self.ends.append(time.perf_counter() - self.last_batch)

    class TimedScoring(LabelWatch):
        """LabelWatch timing its scoring at epoch end (scores, kNN, history, candidates)."""

        def _score(self, *args, **kwargs):
            begin = time.perf_counter()
            try:
                return super()._score(*args, **kwargs)
            finally:
                end.scoring.append(time.perf_counter() - begin)

    class FreshSlabs(LabelWatch):
        """LabelWatch as it captured before: fresh slabs every epoch."""

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            super().on_validation_epoch_end(trainer, pl_module)
            self._spare_slabs = {}

    start, end = Start(), End()
    watch = {"none": [], "lw": [TimedScoring], "lw_fresh": [FreshSlabs]}[variant]
    watchers = [cls(projection="none", dirpath=out) for cls in watch]
    callbacks = [start, *watchers, end]
    data = Features(n, c)
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(_model(c, model), _loader(data, string_ids), _loader(data, string_ids))
    # An epoch's end, with its history write (waited for at the next epoch's start).
    ends = [hook + wait for hook, wait in zip(end.ends, start.waits[1:], strict=False)]
    return end.loops, end.loops_cpu, ends, end.scoring


def _capture_time(n: int, c: int, dtype: torch.dtype | None = None) -> float:
    """Seconds that LabelWatch's capture alone (``EpochBuffer.add`` of every batch's logits,
    embeddings, targets and ids) takes for one epoch outside a Trainer: the copies into
    memory kept from the previous epoch, from the same batch each time (in cache, as a
    forward pass leaves its output), stored in ``dtype`` (None: as they come). Best of 3
    epochs after a first one."""
    from labelwatch.capture import EpochBuffer

    generator = torch.Generator().manual_seed(2)
    logits, embeddings = torch.randn(BATCH, c, generator=generator), torch.randn(BATCH, D)
    targets = torch.randint(0, c, (BATCH,), generator=generator)
    batches = -(-n // BATCH)
    best, spare = float("inf"), None
    for epoch in range(4):
        buffer = EpochBuffer(
            expected_rows=batches * BATCH, reuse=spare, embeddings_dtype=dtype, logits_dtype=dtype
        )
        start = time.perf_counter()
        for i in range(batches):
            ids = torch.arange(i * BATCH, (i + 1) * BATCH)
            buffer.add(logits, targets, ids, embeddings=embeddings)
        if epoch:
            best = min(best, time.perf_counter() - start)
        buffer.collect()
        spare = buffer.slabs()
    return best


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
import sys, tempfile, threading, time
sys.path.insert(0, sys.argv[4])
from lightning.pytorch import Callback, Trainer
import scale
from labelwatch import LabelWatch
n, c, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
page = __import__("os").sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, base = [0], []
def watch():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
class Baseline(Callback):  # listed before LabelWatch: runs before its hooks
    def on_validation_epoch_start(self, *args):
        if not base:  # data, model and Lightning are in memory by now
            base.append(rss())
            threading.Thread(target=watch, daemon=True).start()
data, model = scale.Features(n, c), scale._model(c)
with tempfile.TemporaryDirectory() as out:
    watcher = LabelWatch(projection="none", dirpath=out,
                         logits_dtype=dtype, embeddings_dtype=dtype, history_dtype=dtype)
    trainer = Trainer(max_epochs=2, limit_train_batches=1, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Baseline(), watcher])
    trainer.fit(model, scale._loader(data), scale._loader(data))
    time.sleep(0.05)
print((peak[0] - base[0]) / (n * (c + scale.D) * 4))
"""


def _peak_memory_ratio(n: int, c: int, dtype: str) -> float:
    """Run in a fresh process: a real 2-epoch fit, peak RSS from the first validation epoch
    on (capture, gather, scoring, epoch history, local files) over the raw tensors."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(n), str(c), dtype, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _wandb_table_times(n: int) -> tuple[float, float, int]:
    import wandb

    from labelwatch import score_predictions
    from labelwatch.sinks.wandb import _plain_cells_as_they_are, _table

    frame = score_predictions(logits=torch.randn(n, 10), labels=torch.randint(0, 10, (n,)))
    with tempfile.TemporaryDirectory() as tmp:
        run = wandb.init(project="labelwatch-bench", dir=tmp, mode="offline")
        start = time.perf_counter()
        table = _table(frame, None)
        built = time.perf_counter()
        with _plain_cells_as_they_are():  # as WandbSink.log_epoch logs it
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
    parser.add_argument("--models", nargs="+", default=["head", "mlp"], choices=["head", "mlp"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="validation epochs per fit (>= 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument(
        "--string-ids", action="store_true", help="file names as sample ids instead of ints"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)

    rows = []
    table_cost: dict[int, tuple[float, float, int]] = {}
    variants = ("none", "lw", "lw_fresh")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for n in args.sizes:
                for c in args.classes:
                    loops: dict[str, list[list[float]]] = {v: [] for v in variants}
                    cpu: dict[str, list[list[float]]] = {v: [] for v in variants}
                    epoch_end, scoring = [], []
                    for _ in range(args.repeats):  # interleaved, so drift hits all alike
                        for variant in variants:
                            loop, loop_cpu, end, scored = _timed_fit(
                                n, c, variant, Path(tmp), args.epochs, model, args.string_ids
                            )
                            loops[variant].append(loop)
                            cpu[variant].append(loop_cpu)
                            if variant == "lw":
                                epoch_end += end
                                scoring += scored[1:]  # steady state

                    first = {v: min(fit[0] for fit in loops[v]) for v in variants}
                    steady = {v: min(t for fit in loops[v] for t in fit[1:]) for v in variants}
                    steady_cpu = {v: min(t for fit in cpu[v] for t in fit[1:]) for v in variants}
                    if n not in table_cost:
                        table_cost[n] = _wandb_table_times(n)
                    build, log, logged_rows = table_cost[n]
                    memory = {}
                    if not args.no_memory:
                        memory = {
                            "peak_mem": _peak_memory_ratio(n, c, "float32"),
                            "peak_mem_f16": _peak_memory_ratio(n, c, "float16"),
                        }
                    rows.append(
                        {
                            "model": model,
                            "N": n,
                            "C": c,
                            "loop_s": steady["none"],
                            "loop_lw_s": steady["lw"],
                            "overhead": steady["lw"] / steady["none"],
                            "overhead_first": first["lw"] / first["none"],
                            "overhead_fresh": steady["lw_fresh"] / steady["none"],
                            "overhead_cpu": steady_cpu["lw"] / steady_cpu["none"],
                            "overhead_fresh_cpu": steady_cpu["lw_fresh"] / steady_cpu["none"],
                            "overhead_copy": 1 + _capture_time(n, c) / steady["none"],
                            "overhead_copy_f16": 1
                            + _capture_time(n, c, torch.float16) / steady["none"],
                            "score_s": _scoring_time(n, c),
                            "scoring_lw_s": min(scoring),
                            "epoch_end_s": min(epoch_end),
                            **memory,
                            "table_build_s": build,
                            "table_log_s": log,
                            "table_rows_written": logged_rows,
                        }
                    )
                    print(f"done {model} N={n} C={c}", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    if not args.no_memory:
        for column in ("peak_mem", "peak_mem_f16"):
            frame[f"{column}_marginal"] = _marginal(frame, column)
    print(f"torch threads: {torch.get_num_threads()}, D = {D}, batch = {BATCH}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))


def _marginal(frame: pd.DataFrame, column: str) -> pd.Series:
    """Memory added per extra sample over its raw tensors, from the next smaller N at the
    same C: (peak(N) - peak(N')) / (raw(N) - raw(N')), where peak = ratio x raw. Fixed
    costs (libraries loaded at the first epoch end, allocator pools) cancel out."""
    raw = frame["N"] * (frame["C"] + D) * 4
    peak = frame[column] * raw
    out = pd.Series(float("nan"), index=frame.index)
    for _, group in frame.groupby(["model", "C"]):
        order = group.sort_values("N").index
        for smaller, larger in zip(order[:-1], order[1:], strict=True):
            out[larger] = (peak[larger] - peak[smaller]) / (raw[larger] - raw[smaller])
    return out


if __name__ == "__main__":
    main()
