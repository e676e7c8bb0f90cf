"""Functions that tests run inside a map worker. This module imports nothing heavy, so
that the worker imports only what the code under test imports."""

from __future__ import annotations


def umap_as_the_worker_imports_it() -> dict:
    """Run inside a fresh map worker: import umap-learn as a map does, and report the numba
    functions of umap-learn and pynndescent compiled as their modules load (those with
    explicit signatures) whose code did not come from numba's disk cache."""
    import sys

    from numba.core.registry import CPUDispatcher

    from labelwatch.projection import import_umap

    import_umap()
    compiled = {
        f"{function.__module__}.{function.__name__}": function
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in ("umap", "pynndescent") and module is not None
        for function in vars(module).values()
        if isinstance(function, CPUDispatcher) and function.signatures
    }
    uncached = sorted(name for name, f in compiled.items() if not sum(f.stats.cache_hits.values()))
    return {"compiled": len(compiled), "uncached": uncached, "pandas": "pandas" in sys.modules}


def worker_threads() -> dict:
    """Run inside the map worker: its niceness and each numerical library's threads."""
    import os

    import numpy  # noqa: F401  (its BLAS, as the worker has it loaded)
    from threadpoolctl import threadpool_info

    from labelwatch.projection import WORKER_THREAD_VARIABLES

    return {
        "nice": os.nice(0),
        "pools": [info["num_threads"] for info in threadpool_info()],
        "env": {name: os.environ.get(name) for name in WORKER_THREAD_VARIABLES},
    }
