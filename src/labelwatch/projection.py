"""2-D maps of the validation embeddings: fast, stable from epoch to epoch, off the training path.

- Speed: embeddings are reduced to at most 50 dimensions with PCA before UMAP; neighbours
  come from :mod:`labelwatch.ann` (numpy, all cores, no JIT); optimisation epochs fit the
  size and are fewer when a map starts from the previous one; umap-learn's numba code is
  cached on disk (compiled once per machine), and loaded in the background worker.
- Stability: each map starts from the previous epoch's coordinates matched by sample id;
  samples seen for the first time start at the mean position of their nearest already-placed
  neighbours. Maps are normalised to [0, 10] on both axes (UMAP rescales its initial
  layout to that box), so displacements compare across epochs.
- Budget: above ``max_points`` a class-stratified subsample is mapped that always includes
  every candidate.
- Backends: ``"umap"``, ``"pca"``, ``"none"``, or any picklable callable
  ``f(embeddings (N, D) float32, init (N, 2) or None) -> (N, 2)`` (cuML's UMAP, say).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "MapJob",
    "MapResult",
    "MapWorker",
    "ProjectionMethod",
    "compute_map",
    "project",
    "id_priority",
    "stratified_subsample",
]

log = logging.getLogger(__name__)

# Returns an (N, 2) array; typed Any so that LightningCLI (jsonargparse) takes a function
# without a return annotation, like the README's GPU example, from a config file.
Projector = Callable[[np.ndarray, np.ndarray | None], Any]
ProjectionMethod = Literal["umap", "pca", "none"] | Projector
PROJECTION_METHODS: tuple[str, ...] = ("umap", "pca", "none")

# Below this many points UMAP's neighbour graph is too thin to mean much: use PCA.
MIN_UMAP_POINTS = 16
# UMAP works on at most this many dimensions; PCA first is faster and loses little.
PCA_DIMENSIONS = 50
# Above this many points and dimensions both, PCA's axes come from a randomized SVD.
EXACT_PCA_LIMIT = 2048
# Optimisation epochs: a warm start only needs to settle what changed. Above
# FULL_EPOCH_POINTS points fewer epochs, down to the floors (see `epochs_for`).
COLD_EPOCHS, WARM_EPOCHS = 200, 30
MIN_COLD_EPOCHS, MIN_WARM_EPOCHS = 40, 15
# Random points pushed away per pull: UMAP's 5 for a fresh map; a warm start is already
# spread out, so fewer suffice (each costs as much as a pull).
COLD_NEGATIVE_RATE, WARM_NEGATIVE_RATE = 5, 3
FULL_EPOCH_POINTS = 10_000
MAP_EXTENT = 10.0
# New samples start at the mean position of this many already-placed neighbours.
INIT_NEIGHBOURS = 5
# At fit end a map may take this long, or ten times the slowest job so far if that is
# longer, before the worker counts as stuck (fit must return).
MIN_MAP_PATIENCE_S = 300.0


def check_projection(method: Any) -> None:
    if not (callable(method) or method in PROJECTION_METHODS):
        raise ValueError(
            f"`projection` must be one of {PROJECTION_METHODS} or a callable"
            f" (embeddings, init) -> (N, 2) coordinates, got {method!r}"
        )


def project(
    embeddings: np.ndarray,
    *,
    method: ProjectionMethod = "umap",
    seed: int = 0,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Map ``(N, D)`` embeddings to ``(N, 2)`` coordinates normalised to [0, 10].

    ``init`` (N, 2) is a starting layout (a warm start). Returns the coordinates and the
    method actually used: ``"umap"`` falls back to ``"pca"`` below :data:`MIN_UMAP_POINTS`
    points; ``"none"`` gives NaN. Deterministic for a given ``seed``.
    """
    check_projection(method)
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    if method == "none" or len(embeddings) == 0:
        return np.full((len(embeddings), 2), np.nan), "none"
    if callable(method):
        coords = np.asarray(method(embeddings, init), dtype=np.float64)
        if coords.shape != (len(embeddings), 2):
            raise ValueError(
                f"The projection callable returned shape {coords.shape}; expected"
                f" ({len(embeddings)}, 2)."
            )
        return normalise(coords), getattr(method, "__name__", type(method).__name__)
    if method == "umap" and len(embeddings) >= MIN_UMAP_POINTS:
        return normalise(_umap(reduce_dimensions(embeddings), seed, init)), "umap"
    return normalise(pca(embeddings, 2)), "pca"


def reduce_dimensions(embeddings: np.ndarray, dimensions: int = PCA_DIMENSIONS) -> np.ndarray:
    """PCA to ``dimensions`` when the embeddings are wider than that, else unchanged."""
    if embeddings.shape[1] <= dimensions:
        return embeddings
    return pca(embeddings, dimensions)


def pca(embeddings: np.ndarray, dimensions: int) -> np.ndarray:
    """Top principal components, zero-padded when there are fewer than asked for.

    The axes come from the D x D covariance when N >= D, else from the N x N Gram matrix
    (a conv feature map flattened to D = 10k made the covariance take minutes and
    8 * D^2 bytes). When both N and D exceed ``EXACT_PCA_LIMIT``, either matrix's
    eigendecomposition costs O(min(N, D)^3) (42 s at 3000 x 8000 on 2 cores), and a seeded
    randomized SVD finds the top axes instead. Component signs are fixed so that the map
    does not flip between runs.
    """
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    if min(centred.shape) > EXACT_PCA_LIMIT:
        components = _axes_randomized(centred, dimensions)
    elif centred.shape[1] > len(centred):
        components = _axes_from_gram(centred, dimensions)
    else:
        components = _axes_from_covariance(centred, dimensions)
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    reduced = centred @ (components * signs[:, None]).T.astype(np.float32)
    if reduced.shape[1] < dimensions:
        reduced = np.pad(reduced, ((0, 0), (0, dimensions - reduced.shape[1])))
    return reduced.astype(np.float32)


def _axes_randomized(centred: np.ndarray, dimensions: int) -> np.ndarray:
    """The top axes by scikit-learn's randomized SVD (Halko et al.), seeded: O(N D k)."""
    from sklearn.utils.extmath import randomized_svd

    _, _, axes = randomized_svd(centred, dimensions, n_iter=2, random_state=0)
    return axes


def _axes_from_covariance(centred: np.ndarray, dimensions: int) -> np.ndarray:
    """The top ``dimensions`` principal axes (rows, unit length), from the covariance."""
    covariance = (centred.T @ centred).astype(np.float64)
    values, vectors = np.linalg.eigh(covariance)
    return vectors[:, np.argsort(values)[::-1][:dimensions]].T


def _axes_from_gram(centred: np.ndarray, dimensions: int) -> np.ndarray:
    """The same axes from the Gram matrix X X^T: each is X^T u for an eigenvector u, made
    unit length. Eigenvalues at rounding level (the centred rows span at most N - 1
    dimensions) give no axis: X^T u would be noise, and is left to the zero padding."""
    values, vectors = np.linalg.eigh((centred @ centred.T).astype(np.float64))
    order = np.argsort(values)[::-1][:dimensions]
    tolerance = max(values.max(initial=0.0), 0.0) * len(centred) * np.finfo(np.float32).eps
    order = order[values[order] > tolerance]
    axes = (centred.T @ vectors[:, order]).T
    return axes / np.linalg.norm(axes, axis=1, keepdims=True)


def normalise(coords: np.ndarray) -> np.ndarray:
    """Scale each axis to [0, MAP_EXTENT] (constant axes go to the middle)."""
    coords = np.asarray(coords, dtype=np.float64)
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    scaled = MAP_EXTENT * (coords - low) / span
    scaled[:, high <= low] = MAP_EXTENT / 2
    return scaled


def epochs_for(n_points: int, warm: bool) -> int:
    """Optimisation epochs that fit the size: 200 (cold) / 30 (warm) up to 10k
    points, then fewer so that the work per map stays about that of 10k points; a warm
    start only settles what changed."""
    full = WARM_EPOCHS if warm else COLD_EPOCHS
    floor = MIN_WARM_EPOCHS if warm else MIN_COLD_EPOCHS
    return int(np.clip(full * FULL_EPOCH_POINTS // max(n_points, 1), floor, full))


def _umap(embeddings: np.ndarray, seed: int, init: np.ndarray | None) -> np.ndarray:
    umap = import_umap()
    n_neighbors = min(15, len(embeddings) - 1)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=n_neighbors,
        random_state=seed,
        init=init if init is not None else "spectral",
        n_epochs=epochs_for(len(embeddings), warm=init is not None),
        negative_sample_rate=WARM_NEGATIVE_RATE if init is not None else COLD_NEGATIVE_RATE,
        # Neighbours from labelwatch.ann: on all cores, no NN-descent to compile.
        precomputed_knn=_neighbour_graph(embeddings, n_neighbors, seed),
    )
    with warnings.catch_warnings():
        # random_state disables parallelism: expected, since we ask for determinism;
        # without NN-descent's search index umap cannot `transform`, which we never call.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Cannot cache compiled function")
        return np.asarray(reducer.fit_transform(embeddings), dtype=np.float64)


def _neighbour_graph(embeddings: np.ndarray, n_neighbors: int, seed: int) -> tuple:
    """umap-learn's precomputed_knn: each point first (distance 0), then its neighbours."""
    from labelwatch.ann import approximate_knn

    indices, distances = approximate_knn(embeddings, n_neighbors - 1, seed)
    own = np.arange(len(embeddings))[:, None]
    return (
        np.hstack([own, indices]).astype(np.int32),
        np.hstack([np.zeros_like(own, dtype=np.float32), distances]),
    )


_IN_MAP_WORKER = False  # True in the map worker's process (set by its initializer)


def import_umap() -> types.ModuleType:
    """umap-learn, imported the first time with all of its numba code cached on disk."""
    if "umap" not in sys.modules:
        _import_umap_cached()
    try:
        import umap
    except ImportError as err:  # pragma: no cover - a core dependency
        raise ImportError("projection='umap' needs umap-learn: pip install umap-learn") from err
    cache_numba_code()
    return umap


def _import_umap_cached() -> None:
    """Import umap-learn (and pynndescent) so that their numba functions with explicit
    signatures, which numba compiles as the modules load, come from numba's disk cache too:
    ``numba.njit`` and ``numba.jit`` ask for ``cache=True`` while they load. Two of
    umap-learn's ask for no cache, and compiling them cost the worker 0.3-0.4 s of CPU.

    In the map worker, pandas stays out: it costs 0.4 s of CPU, and scikit-learn imports it
    only to recognise DataFrames, which the worker never passes (elsewhere scikit-learn
    keeps its pandas support)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - a dependency of umap-learn
        return

    decorators = {"njit": numba.njit, "jit": numba.jit}

    def cached(decorator: Callable[..., Any]) -> Callable[..., Any]:
        def with_cache(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return with_cache

    hide_pandas = _IN_MAP_WORKER and "pandas" not in sys.modules
    if hide_pandas:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` fails
    for name, decorator in decorators.items():
        setattr(numba, name, cached(decorator))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Cannot cache compiled function")
            import umap  # noqa: F401
    except ImportError:
        pass  # said by the caller's own import
    finally:
        for name, decorator in decorators.items():
            setattr(numba, name, decorator)
        if hide_pandas and sys.modules.get("pandas", 0) is None:
            del sys.modules["pandas"]


_NUMBA_CACHED = False


def cache_numba_code() -> None:
    """Keep umap-learn's compiled numba code on disk, so that compilation (15-50 s of CPU)
    is paid once per machine and umap-learn version instead of once per process.

    umap-learn does not ask numba to cache; each of its jitted functions is switched to
    numba's own file cache, which is keyed by source file and signature and rebuilt when
    umap-learn changes. A function numba cannot cache is compiled as before.
    """
    global _NUMBA_CACHED
    if _NUMBA_CACHED:
        return
    import umap  # noqa: F401  (imports the modules whose functions are cached)
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "umap" or module is None:
            continue
        for function in vars(module).values():
            if isinstance(function, CPUDispatcher) and isinstance(function._cache, NullCache):
                try:
                    function.enable_caching()
                except Exception as err:  # noqa: BLE001 - a cache is only an optimisation
                    log.debug("numba cannot cache %s: %s", function, err)
    _NUMBA_CACHED = True


def initial_layout(
    sample_ids: Sequence[Any], embeddings: np.ndarray, previous: Mapping[Any, tuple[float, float]]
) -> np.ndarray | None:
    """Previous coordinates by id; new ids at the mean of their nearest placed neighbours.

    None when fewer than half of the samples were placed before (a fresh map is better).
    """
    known = np.array([sample_id in previous for sample_id in sample_ids])
    if known.sum() < max(INIT_NEIGHBOURS, len(sample_ids) // 2):
        return None
    init = np.zeros((len(sample_ids), 2))
    init[known] = [previous[i] for i, k in zip(sample_ids, known, strict=True) if k]
    if not known.all():
        from sklearn.neighbors import NearestNeighbors

        reduced = reduce_dimensions(embeddings)
        finder = NearestNeighbors(n_neighbors=INIT_NEIGHBOURS).fit(reduced[known])
        _, neighbours = finder.kneighbors(reduced[~known])
        init[~known] = init[known][neighbours].mean(axis=1)
    return init


def stratified_subsample(
    labels: np.ndarray,
    must_include: np.ndarray,
    max_points: int,
    seed: int = 0,
    priority: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows: every ``must_include`` row (in order,
    up to the budget), then the rest of the budget split across classes in proportion.

    Within a class the rows of lowest ``priority`` are taken (random from ``seed`` when
    None). A priority that belongs to the sample, such as :func:`id_priority`, picks the
    same samples epoch after epoch, as far as the candidates and budget allow (a larger
    quota takes a superset), so the maps of consecutive epochs share their points and can
    be warm-started."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    if priority is None:
        priority = np.random.default_rng(seed).random(n)
    chosen = np.asarray(must_include, dtype=np.int64)[:max_points]
    budget = max_points - len(chosen)
    rest = np.setdiff1d(np.arange(n), chosen)
    picked = []
    if budget > 0 and len(rest):
        classes, counts = np.unique(labels[rest], return_counts=True)
        quota = np.floor(counts / counts.sum() * budget).astype(int)
        quota[np.argsort(-counts)[: budget - quota.sum()]] += 1  # hand out the remainder
        for label, take in zip(classes, quota, strict=True):
            members = rest[labels[rest] == label]
            picked.append(members[np.argsort(priority[members], kind="stable")[:take]])
    return np.sort(np.concatenate([chosen, *picked])).astype(np.int64)


def id_priority(sample_ids: Sequence[Any], seed: int = 0) -> np.ndarray:
    """A pseudo-random ``uint64`` per sample id, the same in every epoch and process for
    a given ``seed``: :func:`stratified_subsample`'s ``priority``."""
    import pandas as pd  # not at the top: the map worker process never needs it

    key = f"labelwatch{seed:06d}"[-16:]
    return pd.util.hash_array(np.asarray(list(sample_ids), dtype=object), hash_key=key)


@dataclass
class MapJob:
    """What the worker needs: ids, embeddings of the rows to map, and the previous map."""

    epoch: int
    sample_ids: list[Any]
    embeddings: np.ndarray
    previous: dict[Any, tuple[float, float]]
    method: ProjectionMethod
    seed: int
    stream: str | None = None  # which validation dataloader
    previous_epoch: int = -1  # the epoch `previous` comes from


@dataclass
class MapResult:
    epoch: int
    sample_ids: list[Any]
    coords: np.ndarray
    method: str
    warm_started: bool


# The worker's own latest map per stream: when epochs outpace maps, the trainer has not yet
# received map n when it submits n + 1, but the worker, which runs jobs in order, has.
_LATEST: dict[str | None, tuple[int, dict[Any, tuple[float, float]]]] = {}


def compute_map(job: MapJob) -> MapResult:
    """Project one epoch, warm-started from the newest previous map when enough ids match."""
    previous_epoch, previous = job.previous_epoch, job.previous
    cached = _LATEST.get(job.stream)
    if cached is not None and previous_epoch < cached[0] < job.epoch:
        previous_epoch, previous = cached
    init = None
    if job.method == "umap" or callable(job.method):
        init = initial_layout(job.sample_ids, job.embeddings, previous)
    coords, used = project(job.embeddings, method=job.method, seed=job.seed, init=init)
    if used != "none":
        _LATEST[job.stream] = (
            job.epoch,
            dict(zip(job.sample_ids, map(tuple, coords.tolist()), strict=True)),
        )
    return MapResult(job.epoch, job.sample_ids, coords, used, init is not None)


def _warm_up(seed: int) -> None:
    """Load (or, the first time on a machine, compile) UMAP's numba code in the worker
    before the first real map needs it."""
    points = np.random.default_rng(seed).normal(size=(64, 8)).astype(np.float32)
    project(points, method="umap", seed=seed)
    project(points, method="umap", seed=seed, init=np.random.default_rng(seed).random((64, 2)))


# The map worker's numerical libraries run one thread each, set before they load.
WORKER_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def _init_worker() -> None:
    """Run the worker at a lower CPU priority and on one thread: training goes first.

    One thread: measured on 2 cores (``benchmarks/projection.py``, ``warm_cpu_s``), a warm
    map takes 30-45% less CPU than with two threads (0.08 s against 0.11 s at 900 points,
    3.2-3.8 s against 5.5-6.0 s at 50k) for a wall time within about 25% either way, and
    the CPU it saves is training's (umap-learn's layout runs on one thread once seeded).

    Marks the process as the map worker (:func:`_import_umap_cached`). Also gives tqdm
    (umap-learn's progress bars) a thread lock instead of the process-shared
    one it would create: the worker is stopped with ``os._exit``, and a shared lock left
    behind makes multiprocessing warn about a leaked semaphore at the trainer's exit."""
    global _IN_MAP_WORKER
    _IN_MAP_WORKER = True
    try:
        os.nice(10)
    except (AttributeError, OSError):  # not on every platform
        pass
    for variable in WORKER_THREAD_VARIABLES:  # for libraries not loaded yet (numba, OpenMP)
        os.environ[variable] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn
        pass
    else:
        threadpool_limits(1)  # numpy's BLAS, loaded already
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - a dependency of umap-learn
        return
    tqdm.set_lock(threading.RLock())


class MapWorker:
    """One background process that computes maps in submission order.

    A process rather than a thread: numba's compiled UMAP holds the GIL for long
    stretches, which would stall the training loop.
    """

    def __init__(self, warm_up: bool = True, seed: int = 0, import_main: bool = False) -> None:
        """``import_main``: let the worker import the training script, which it needs only
        to run a projection function defined there."""
        context = multiprocessing.get_context("spawn")  # no fork of a threaded trainer
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_init_worker
        )
        # The pool starts its process on the first submit: start it now, off the epoch path.
        self.slowest_s = 0.0  # the longest a job took from its submission
        with contextlib.nullcontext() if import_main else _training_script_hidden():
            self._futures = [self._timed(self._pool.submit(_warm_up if warm_up else _ready, seed))]

    def submit(self, job: MapJob) -> Future:
        future = self._timed(self._pool.submit(compute_map, job))
        # Only those not done: a done one holds its map, which a long fit would pile up.
        self._futures = [f for f in self._futures if not f.done()] + [future]
        return future

    def patience(self) -> float:
        """Seconds a map may take at fit end before the worker counts as stuck."""
        return max(MIN_MAP_PATIENCE_S, 10 * self.slowest_s)

    def _timed(self, future: Future) -> Future:
        submitted = time.monotonic()

        def finished(_: Future) -> None:
            self.slowest_s = max(self.slowest_s, time.monotonic() - submitted)

        future.add_done_callback(finished)
        return future

    def shutdown(self) -> None:
        """Stop now. Callers first wait for the maps they need; what remains (at most the
        warm-up) is not worth waiting for, and the worker holds nothing else. Never
        raises: a worker that died (killed for memory, say) is only cleaned up after."""
        if all(future.done() for future in self._futures):
            # Idle: the worker leaves at once (`_exit`) instead of spending seconds
            # tearing down torch and numba, and without holding the pool's queue lock.
            with contextlib.suppress(BrokenProcessPool):  # it is gone already
                self._pool.submit(_exit_worker)
            self._pool.shutdown(wait=True)
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
            process.join(timeout=10)
            if process.is_alive():  # stopped or stuck: SIGTERM is not enough
                process.kill()
                process.join(timeout=10)
        self._pool.shutdown(wait=True)  # now quick: releases the pool's queues and locks


@contextlib.contextmanager
def _training_script_hidden() -> Iterator[None]:
    """A spawned process imports its parent's ``__main__``: here the user's training script,
    which costs seconds of CPU that training needs (and would run the script's top level
    again were it not guarded). While the worker starts, ``__main__`` is an empty module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _ready(seed: int) -> None:
    """The first job when there is nothing to warm up: it only starts the process."""


def _exit_worker() -> None:
    os._exit(0)
