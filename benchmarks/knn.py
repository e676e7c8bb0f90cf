"""kNN agreement's neighbour search on a CPU: exact against approximate, side by side.

Prints one table over N x the share of identical rows (duplicated clips), D = 256 and k = 10,
on points in 100 Gaussian clusters: seconds for the exact search
(``labelwatch.neighbours.knn_neighbours``) and for ``approximate_neighbours``, the one
LabelWatch uses above 8192 samples when the embeddings are on a CPU (the map's
inverted-file search; past 40% identical rows it searches exactly), their ratio, and the
share of the exact neighbours the approximate search found (``recall``). Among identical
rows every choice of neighbours is as near, so recall with them counts mostly the other
rows' share. (All-zero rows, which earlier versions timed here, are left out of the
search since they have no direction.) The search runs at the end of every validation
epoch, in the training process.

    python benchmarks/knn.py
    python benchmarks/knn.py --sizes 10000 --identical-shares 0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from labelwatch.neighbours import approximate_neighbours, knn_neighbours

K, DIM, CLUSTERS = 10, 256, 100


def points(n: int, identical_share: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    noise = 0.7 * rng.normal(size=(n, DIM)).astype(np.float32)
    x = torch.from_numpy(centres[rng.integers(0, CLUSTERS, n)] + noise)
    x[: int(identical_share * n)] = x[-1]
    return x


def timed(search, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    found = search(x, k=K)
    return found, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 50_000])
    parser.add_argument("--identical-shares", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, D = {DIM}, k = {K}")
    rows = []
    for n in args.sizes:
        for share in args.identical_shares:
            x = points(n, share)
            exact, exact_s = timed(knn_neighbours, x)
            approximate, approximate_s = timed(approximate_neighbours, x)
            found = (approximate[:, :, None] == exact[:, None, :]).any(dim=2)
            rows.append(
                {
                    "N": n,
                    "identical_rows": share,
                    "exact_s": exact_s,
                    "approximate_s": approximate_s,
                    "speedup": exact_s / approximate_s,
                    "recall": float(found.float().mean()),
                }
            )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
