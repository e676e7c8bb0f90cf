"""Maps: time per map cold and warm-started, and how far points move between epochs.

Prints one table over N x D: seconds per map after numba's compilation (``cold_s``: a
fresh UMAP; ``warm_s``: started from the previous epoch's map), and the median displacement
of a point between two consecutive epochs as a fraction of the map's extent, with and
without the warm start (``moved_warm`` / ``moved_cold``). "Epoch 2" is epoch 1's
embeddings with small noise, in shuffled order (ids matched), as a model that changed
little would give. Targets on 2 cores: 3k points warm <= 0.5 s; 50k cold <= 12 s and
warm <= 5 s; moved_warm <= moved_cold / 5.

With ``--urban-sounds`` it also trains the urban-sounds example for ``--epochs`` epochs
with LabelWatch(projection="umap") and without it, and prints the wall-time ratio
(target <= 1.05), compilation included.

    python benchmarks/projection.py
    python benchmarks/projection.py --sizes 3000 --dims 128
    python benchmarks/projection.py --urban-sounds --epochs 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from labelwatch.projection import MAP_EXTENT, MapJob, _warm_up, compute_map


def clusters(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(20, d))
    labels = rng.integers(0, 20, size=n)
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32)


def one_size(n: int, d: int) -> dict:
    ids = list(range(n))
    first_epoch = clusters(n, d)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    second_epoch = (first_epoch + rng.normal(scale=0.3, size=first_epoch.shape))[order]
    second_ids = [ids[i] for i in order]

    start = time.perf_counter()
    first = compute_map(MapJob(0, ids, first_epoch, {}, "umap", 0))
    cold_s = time.perf_counter() - start
    previous = dict(zip(first.sample_ids, map(tuple, first.coords), strict=True))
    start = time.perf_counter()
    warm = compute_map(MapJob(1, second_ids, second_epoch.astype(np.float32), previous, "umap", 1))
    warm_s = time.perf_counter() - start
    cold = compute_map(MapJob(1, second_ids, second_epoch.astype(np.float32), {}, "umap", 1))
    before = np.array([previous[i] for i in second_ids])

    def moved(coords: np.ndarray) -> float:
        return float(np.median(np.linalg.norm(coords - before, axis=1)) / MAP_EXTENT)

    return {
        "N": n,
        "D": d,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "moved_cold": moved(cold.coords),
        "moved_warm": moved(warm.coords),
        "ratio": moved(cold.coords) / max(moved(warm.coords), 1e-12),
    }


def urban_sounds_ratio(epochs: int) -> pd.DataFrame:
    """Wall time of the urban-sounds example with and without LabelWatch, fresh processes."""
    rows = []
    for with_labelwatch in (False, True):
        command = [
            sys.executable,
            "-m",
            "examples.urban_sounds.train",
            "fit",
            "--config",
            "configs/urban_sounds.yaml",
            f"--trainer.max_epochs={epochs}",
        ]
        if not with_labelwatch:
            command.append("--trainer.callbacks=[]")
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        rows.append({"labelwatch": with_labelwatch, "wall_s": time.perf_counter() - start})
    frame = pd.DataFrame(rows)
    frame["ratio"] = frame["wall_s"] / frame["wall_s"].iloc[0]
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3_000, 10_000, 50_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--urban-sounds", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    start = time.perf_counter()
    _warm_up(0)
    print(f"numba compilation (once per process): {time.perf_counter() - start:.1f} s")
    rows = [one_size(n, d) for n in args.sizes for d in args.dims]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.urban_sounds:
        print(f"\nurban-sounds example, {args.epochs} epochs:")
        print(urban_sounds_ratio(args.epochs).to_string(index=False))


if __name__ == "__main__":
    main()
