"""Maps: time per map cold and warm-started, and how far points move between epochs.

Prints one table over N x D: seconds per map after numba's compilation (``cold_s``: a
fresh UMAP; ``warm_s``: started from the previous epoch's map), and the median displacement
of a point between two consecutive epochs as a fraction of the map's extent, with and
without the warm start (``moved_warm`` / ``moved_cold``); ``warm_cpu_s`` is the warm map's
CPU time over all threads (the map worker runs one: ``OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1`` measures as it does). "Epoch 2" is epoch 1's
embeddings with small noise, in shuffled order (ids matched), as a model that changed
little would give. Targets on 2 cores: 3k points warm <= 0.5 s; 50k cold <= 12 s and
warm <= 5 s; moved_warm <= moved_cold / 5.

Quality: ``purity_*`` is the fraction of a point's 10 nearest neighbours that share its
cluster, in the input (``purity_input``) and on each map. ``umap_learn_s`` and
``umap_learn_purity`` are a cold map from plain, seeded umap-learn on the same points,
side by side (``--no-reference`` skips them).

With ``--urban-sounds`` it also trains the urban-sounds example for ``--epochs`` epochs
with LabelWatch(projection="umap") and without it, and prints the wall-time ratio
(target <= 1.05), compilation included: with numba's on-disk cache as a previous run
left it, and with an empty cache (the first run on a machine; ``--no-first-run`` skips it).
The runs take turns for ``--repeats`` rounds; the table gives each one's median wall time
and all its runs, and the median CPU time of its process tree (``cpu_s``, the map worker
included) with its ratio, steadier than wall time on a shared machine.

    python benchmarks/projection.py
    python benchmarks/projection.py --sizes 3000 --dims 128
    python benchmarks/projection.py --urban-sounds --epochs 10
    python benchmarks/projection.py --sizes --urban-sounds --no-first-run --repeats 5
    python benchmarks/projection.py --sizes --worker-start 8

``--worker-start R`` gives the CPU seconds a fresh map worker spends before its first map
(``ready_cpu_s``: starting, importing umap-learn, the warm-up maps; numba's cache filled):
as LabelWatch imports umap-learn, and after a plain ``import umap``. The two take turns
for R rounds; medians and every run.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd

from labelwatch.projection import (
    MAP_EXTENT,
    MapJob,
    MapWorker,
    _warm_up,
    compute_map,
    reduce_dimensions,
)


def clusters(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """20 Gaussian clusters that overlap at their edges, as classes in a model's embedding
    space do (most of a point's nearest neighbours share its cluster, not all): points and
    cluster labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=np.sqrt(0.8 * np.sqrt(8 * d) / d), size=(20, d))
    labels = rng.integers(0, 20, size=n)
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def purity(coords: np.ndarray, labels: np.ndarray, k: int = 10, sample: int = 2000) -> float:
    """Map quality: the fraction of a point's k nearest map neighbours in its own cluster."""
    from labelwatch.ann import approximate_knn

    found, _ = approximate_knn(coords, k)
    rows = np.random.default_rng(0).choice(len(coords), min(sample, len(coords)), replace=False)
    return float((labels[found[rows]] == labels[rows, None]).mean())


def umap_learn_reference(points: np.ndarray, labels: np.ndarray) -> dict:
    """umap-learn as a user would call it (its own neighbour search and epoch counts),
    seeded, on the same PCA-reduced points: seconds and purity of a cold map."""
    import umap

    reduced = reduce_dimensions(points)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = umap.UMAP(random_state=0).fit_transform(reduced)
    return {
        "umap_learn_s": time.perf_counter() - start,
        "umap_learn_purity": purity(coords, labels),
    }


def one_size(n: int, d: int, reference: bool) -> dict:
    ids = list(range(n))
    first_epoch, labels = clusters(n, d)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    second_epoch = (first_epoch + rng.normal(scale=0.3, size=first_epoch.shape))[order]
    second_ids = [ids[i] for i in order]

    start = time.perf_counter()
    first = compute_map(MapJob(0, ids, first_epoch, {}, "umap", 0))
    cold_s = time.perf_counter() - start
    previous = dict(zip(first.sample_ids, map(tuple, first.coords), strict=True))
    start, cpu_start = time.perf_counter(), time.process_time()
    warm = compute_map(MapJob(1, second_ids, second_epoch.astype(np.float32), previous, "umap", 1))
    warm_s, warm_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    cold = compute_map(MapJob(1, second_ids, second_epoch.astype(np.float32), {}, "umap", 1))
    before = np.array([previous[i] for i in second_ids])

    def moved(coords: np.ndarray) -> float:
        return float(np.median(np.linalg.norm(coords - before, axis=1)) / MAP_EXTENT)

    row = {
        "N": n,
        "D": d,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "warm_cpu_s": warm_cpu_s,
        "purity_input": purity(first_epoch, labels),
        "purity_cold": purity(first.coords, labels),
        "purity_warm": purity(warm.coords, labels[order]),
        "moved_cold": moved(cold.coords),
        "moved_warm": moved(warm.coords),
        "ratio": moved(cold.coords) / max(moved(warm.coords), 1e-12),
    }
    return row | (umap_learn_reference(first_epoch, labels) if reference else {})


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished (joined) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def urban_sounds_ratio(epochs: int, repeats: int, first_run: bool = True) -> pd.DataFrame:
    """Wall time of the urban-sounds example without LabelWatch, with it, and with it on a
    machine whose numba cache is empty (its first run there; ``first_run=False`` skips it),
    each in a fresh process, and the CPU time of each process tree (``cpu_s``: user +
    system of the run and its children, the map worker included).

    The variants take turns, ``repeats`` rounds of them, and each gets its median: on a
    shared 2-core machine one run of the same job varies by 10-20%, more than the effect.
    The CPU time moves less with the machine's other load than the wall time does."""
    import os
    import tempfile

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as empty_cache:
            runs = [
                ("without", False, {}),
                ("with", True, {}),
                ("with, empty numba cache", True, {"NUMBA_CACHE_DIR": empty_cache}),
            ][: 3 if first_run else 2]
            for name, with_labelwatch, env in runs:
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
                start, cpu_start = time.perf_counter(), children_cpu()
                subprocess.run(command, check=True, capture_output=True, env=os.environ | env)
                times.setdefault(name, []).append(time.perf_counter() - start)
                cpu.setdefault(name, []).append(children_cpu() - cpu_start)
    frame = pd.DataFrame(
        {
            "labelwatch": name,
            "wall_s": float(np.median(runs)),
            "cpu_s": float(np.median(cpu[name])),
            "runs_s": " ".join(f"{run:.1f}" for run in runs),
        }
        for name, runs in times.items()
    )
    frame.insert(2, "ratio", frame["wall_s"] / frame["wall_s"].iloc[0])
    frame.insert(4, "cpu_ratio", frame["cpu_s"] / frame["cpu_s"].iloc[0])
    return frame


def worker_start_cpu(repeats: int) -> pd.DataFrame:
    """CPU seconds of a fresh map worker up to its first map, with LabelWatch's import of
    umap-learn and with a plain one, taking turns."""

    def ready(plain: bool) -> float:
        start = children_cpu()
        worker = MapWorker(warm_up=False)
        if plain:
            worker._pool.submit(exec, "import umap")  # a builtin: the worker finds it
        worker._pool.submit(_warm_up, 0).result()
        worker.shutdown()  # joins the process, whose CPU then counts
        return children_cpu() - start

    ready(False)  # fills numba's cache if it is empty
    runs: dict[str, list[float]] = {"labelwatch": [], "plain import umap": []}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(ready(name != "labelwatch"))
    return pd.DataFrame(
        {
            "import": name,
            "ready_cpu_s": float(np.median(spent)),
            "runs_s": " ".join(f"{s:.2f}" for s in spent),
        }
        for name, spent in runs.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[3_000, 10_000, 50_000], help="none: no maps"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the plain umap-learn columns"
    )
    parser.add_argument("--urban-sounds", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the urban-sounds runs (medians)"
    )
    parser.add_argument(
        "--no-first-run", action="store_true", help="skip the run with an empty numba cache"
    )
    parser.add_argument("--worker-start", type=int, default=0, metavar="ROUNDS")
    args = parser.parse_args()

    if args.sizes:
        start = time.perf_counter()
        _warm_up(0)
        print(f"numba compilation (once per process): {time.perf_counter() - start:.1f} s")
        if not args.no_reference:  # umap-learn's own neighbour search compiles once, here
            umap_learn_reference(*clusters(300, 8))
        rows = [one_size(n, d, not args.no_reference) for n in args.sizes for d in args.dims]
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.worker_start:
        print("\nmap worker, CPU seconds before its first map:")
        table = worker_start_cpu(args.worker_start)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.urban_sounds:
        print(f"\nurban-sounds example, {args.epochs} epochs:")
        ratios = urban_sounds_ratio(args.epochs, args.repeats, not args.no_first_run)
        print(ratios.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
