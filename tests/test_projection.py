"""Maps: fallbacks, determinism, warm-start alignment, budgets, and the background worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger

from labelwatch import LabelWatch, load_candidates, projection
from labelwatch.projection import (
    WORKER_THREAD_VARIABLES,
    MapJob,
    MapWorker,
    compute_map,
    id_priority,
    pca,
    project,
    stratified_subsample,
)
from tests.helpers import (
    TinyClassifier,
    dying_projection,
    finish_wandb,
    gated_projection,
    loaders,
    offline_run_dir,
    slow_projection,
    trainer_kwargs,
)
from tests.worker_probes import umap_as_the_worker_imports_it, worker_threads


def _clusters(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    centres = rng.normal(scale=6, size=(4, 32))
    return (centres[labels] + rng.normal(size=(n, 32))).astype(np.float32), labels


def test_few_points_fall_back_to_pca_and_none_gives_nan():
    """Below 16 points UMAP is replaced by PCA; 'none' returns NaN coordinates."""
    points, _ = _clusters(10)
    coords, used = project(points, method="umap")
    assert used == "pca" and coords.shape == (10, 2)
    assert coords.min() == 0 and coords.max() == 10  # normalised to [0, 10]
    nan, used = project(points, method="none")
    assert used == "none" and np.isnan(nan).all()


def test_umap_is_deterministic_with_a_seed():
    """The same seed gives the same map; another seed a different one."""
    points, _ = _clusters(200)
    first, used = project(points, method="umap", seed=3)
    again, _ = project(points, method="umap", seed=3)
    other, _ = project(points, method="umap", seed=4)
    assert used == "umap"
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_warm_start_keeps_points_in_place_when_ids_arrive_in_another_order():
    """Matched by id, a shuffled epoch lands near the previous map; a cold map does not."""
    points, _ = _clusters(300)
    ids = [f"s{i}" for i in range(300)]
    first = compute_map(MapJob(0, ids, points, {}, "umap", 0))
    previous = dict(zip(first.sample_ids, map(tuple, first.coords), strict=True))
    order = np.random.default_rng(1).permutation(300)
    moved = points[order] + np.random.default_rng(2).normal(scale=0.1, size=points.shape)
    shuffled_ids = [ids[i] for i in order]
    warm = compute_map(MapJob(1, shuffled_ids, moved.astype(np.float32), previous, "umap", 7))
    cold = compute_map(MapJob(1, shuffled_ids, moved.astype(np.float32), {}, "umap", 7))
    before = np.array([previous[i] for i in shuffled_ids])
    warm_shift = np.median(np.linalg.norm(warm.coords - before, axis=1))
    cold_shift = np.median(np.linalg.norm(cold.coords - before, axis=1))
    assert warm.warm_started and not cold.warm_started
    # map extent is 10; umap's float results differ by CPU (warm 0.7-1.6 on an AMD EPYC,
    # with 6.6-8.5 cold), so the bound that matters is the ratio, the target
    assert warm_shift < 2.0 < cold_shift
    assert warm_shift < cold_shift / 5


def test_new_ids_start_next_to_their_neighbours():
    """An id seen for the first time starts at its nearest placed neighbours' position."""
    from labelwatch.projection import initial_layout

    points, labels = _clusters(100)
    previous = {i: (float(labels[i]), 0.0) for i in range(1, 100)}
    init = initial_layout(list(range(100)), points, previous)
    assert init[0].tolist() == [float(labels[0]), 0.0]  # cluster 0's neighbours sit at x=0


def test_subsample_keeps_every_candidate_and_the_class_balance():
    """max_points rows: all must-include rows, the rest split by class in proportion."""
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    must = np.array([5, 950, 999, 400])
    rows = stratified_subsample(labels, must, max_points=100, seed=0)
    assert len(rows) == 100 and set(must) <= set(rows)
    counts = np.bincount(labels[rows], minlength=3)
    assert abs(counts[0] - 2 * counts[1]) <= 3 and counts[2] >= 9


def test_a_subsample_by_id_priority_keeps_its_samples_from_epoch_to_epoch():
    """Ranked by a priority that belongs to each id, the subsamples of two epochs whose
    candidates differ share nearly all other rows, and a larger budget takes a superset."""
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    ids = [f"clip-{i}" for i in range(1000)]
    priority = id_priority(ids, seed=3)
    assert np.array_equal(priority, id_priority(list(ids), seed=3))  # the same every call
    first = stratified_subsample(labels, np.array([5, 950]), 100, priority=priority)
    second = stratified_subsample(labels, np.array([7, 400, 990]), 100, priority=priority)
    assert len(set(first) & set(second)) >= 95
    larger = stratified_subsample(labels, np.array([5, 950]), 200, priority=priority)
    assert set(first) <= set(larger)


def test_maps_above_max_points_are_warm_started(tmp_path: Path):
    """Above max_points the same samples are mapped every epoch (bar candidate changes),
    so the second map starts from the first and `moved` is known for nearly every point."""
    train, val = loaders(num_val=90, flip=6)
    callback = LabelWatch(projection="umap", max_points=40, map_in_background=False)
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=2)).fit(
        TinyClassifier(), train, val
    )
    summary = json.loads((callback.last_output_dir / "summary.json").read_text())
    assert summary["map_points"] == 40 and summary["map_warm_started"]
    samples = pd.read_parquet(callback.last_output_dir / "samples.parquet")
    assert samples["moved"].notna().sum() >= 30


def test_callback_maps_a_subsample_with_every_candidate(tmp_path: Path):
    """With max_points below N, every candidate has coordinates and the rest partly NaN."""
    train, val = loaders(num_val=90, flip=12)
    callback = LabelWatch(projection="pca", max_points=30, max_candidates=10)
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, val
    )
    samples = pd.read_parquet(tmp_path / "labelwatch/epoch=0/samples.parquet")
    candidates = pd.read_parquet(tmp_path / "labelwatch/epoch=0/candidates.parquet")
    assert len(samples) == 90 and samples["x"].notna().sum() == 30
    assert len(candidates) > 0 and candidates["x"].notna().all()


class _InterruptAfterFirstEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_background_maps_land_with_their_epoch_and_fit_end_flushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Slow background maps: each epoch's table and files get their own map by fit end,
    which says what it is waiting for.

    Two epochs: the second map waits behind the first, which the worker's bound allows."""
    import labelwatch.callback

    said: list[str] = []
    monkeypatch.setattr(labelwatch.callback, "rank_zero_info", said.append)
    train, val = loaders()
    logger = WandbLogger(project="maps", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection=slow_projection, map_in_background=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=2))
    trainer.fit(TinyClassifier(), train, val)
    assert any(m.startswith("LabelWatch: finishing") and "map(s)" in m for m in said), said
    for epoch in range(2):
        folder = callback.output_root / f"epoch={epoch}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["projection"] == "slow_projection"
        assert pd.read_parquet(folder / "samples.parquet")["x"].notna().all()
    assert json.loads((callback.output_root / "epoch=1/summary.json").read_text())[
        "map_warm_started"
    ]
    tables = sorted(
        (offline_run_dir(tmp_path) / "files/media/table/labelwatch").glob("samples_*"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    epochs = [json.loads(p.read_text())["data"][0][1] for p in tables]
    assert epochs == [0, 1]


def test_a_map_worker_that_dies_costs_the_maps_not_the_fit(tmp_path: Path):
    """The worker is killed inside its first map (as for memory): the fit goes on, every
    epoch is written (and logged) without coordinates, a warning says why, and fit end
    leaves no process behind."""
    train, val = loaders()
    logger = WandbLogger(project="maps", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection=dying_projection, map_in_background=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=3))
    with pytest.warns(UserWarning) as record:
        trainer.fit(TinyClassifier(), train, val)
    finish_wandb()
    assert trainer.current_epoch == 3
    messages = " ".join(str(w.message) for w in record)
    assert "BrokenProcessPool" in messages
    _assert_logged_without_maps(callback, tmp_path, epochs=3)


def _assert_logged_without_maps(callback: LabelWatch, tmp_path: Path, epochs: int) -> None:
    """Every epoch was written and logged to W&B without coordinates, and no worker
    process is left."""
    import multiprocessing

    for epoch in range(epochs):
        summary = json.loads((callback.output_root / f"epoch={epoch}/summary.json").read_text())
        assert summary["projection"] == "none"
    tables = (offline_run_dir(tmp_path) / "files/media/table/labelwatch").glob("samples_*")
    assert len(list(tables)) == epochs
    assert not multiprocessing.active_children()


class _OpenGateAtEpoch(Callback):
    def __init__(self, gate: Path, epoch: int) -> None:
        self.gate, self.epoch = gate, epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.gate.touch()


def test_epochs_whose_maps_are_dropped_are_still_logged_in_epoch_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The first map blocks until the last epoch: the maps waiting behind it are dropped
    (bounded worker memory), and those epochs reach W&B without coordinates, each after
    the epochs before it, so W&B's steps and artifact versions follow the epochs."""
    gate = tmp_path / "gate"
    monkeypatch.setenv("LABELWATCH_TEST_GATE", str(gate))
    train, val = loaders()
    logger = WandbLogger(project="maps", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection=gated_projection, map_in_background=True)
    callbacks = [callback, _OpenGateAtEpoch(gate, epoch=4)]
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks, max_epochs=5))
    with pytest.warns(UserWarning, match="maps are slower than validation epochs"):
        trainer.fit(TinyClassifier(), train, val)
    finish_wandb()
    projections = [
        json.loads((callback.output_root / f"epoch={e}/summary.json").read_text())["projection"]
        for e in range(5)
    ]
    assert projections[0] == projections[4] == "gated_projection"
    assert "none" in projections
    tables = sorted(
        (offline_run_dir(tmp_path) / "files/media/table/labelwatch").glob("samples_*"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    assert [json.loads(p.read_text())["data"][0][1] for p in tables] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError, "could not write its local outputs.*read-only"),
        (ValueError, "could not write its local outputs.*ValueError.*read-only"),
    ],
)
def test_coordinates_are_added_on_the_logging_thread_and_a_failed_rewrite_keeps_scores(
    tmp_path: Path, monkeypatch, error, message
):
    """Scores are written on the training thread at epoch end; the rewrite that adds the
    map's coordinates runs on the logging thread. If it fails, a warning says so and the
    first files stay complete."""
    import threading

    from labelwatch.sinks.local import LocalSink

    writes = []
    original = LocalSink.write

    def write(self, epoch, samples, candidates, summary):
        writes.append((epoch, summary["projection"], threading.current_thread().name))
        if summary["projection"] != "pending":
            raise error("disk went read-only")
        return original(self, epoch, samples, candidates, summary)

    monkeypatch.setattr(LocalSink, "write", write)
    train, val = loaders()
    callback = LabelWatch(projection=slow_projection, map_in_background=True)
    with pytest.warns(UserWarning, match=message):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=2)).fit(
            TinyClassifier(), train, val
        )
    firsts = sorted((e, t) for e, projection, t in writes if projection == "pending")
    rewrites = sorted((e, t) for e, projection, t in writes if projection == "slow_projection")
    assert firsts == [(0, "MainThread"), (1, "MainThread")]
    assert [e for e, _ in rewrites] == [0, 1]
    assert all(thread.startswith("labelwatch-logging") for _, thread in rewrites)
    for epoch in range(2):
        samples = pd.read_parquet(tmp_path / f"labelwatch/epoch={epoch}/samples.parquet")
        assert len(samples) == 48 and samples["x"].isna().all()


def test_an_interrupt_logs_outstanding_epochs_without_coordinates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C while a map is running: the epoch is still written, without a map, and a
    line says which epochs lost their maps."""
    import labelwatch.callback

    said: list[str] = []
    monkeypatch.setattr(labelwatch.callback, "rank_zero_info", said.append)
    train, val = loaders()
    callback = LabelWatch(projection=slow_projection, map_in_background=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, callbacks=[callback, _InterruptAfterFirstEpoch()], max_epochs=3)
    )
    with pytest.raises(SystemExit):  # Lightning exits with status 1 after Ctrl-C
        trainer.fit(TinyClassifier(), train, val)
    summary = json.loads((tmp_path / "labelwatch/epoch=0/summary.json").read_text())
    assert summary["num_samples"] == 48
    assert summary["projection"] in ("none", "slow_projection")  # the map may just have landed
    if summary["projection"] == "none":
        assert "the fit stopped with the maps of epoch(s) [0] unfinished" in " ".join(said)
    assert not (tmp_path / "labelwatch/epoch=1").exists()


def test_wide_embeddings_get_the_covariances_pca_from_the_gram_matrix(monkeypatch):
    """With more dimensions than points the axes come from the N x N Gram matrix, never
    the D x D covariance, and the points land where the covariance puts them, signs
    included; axes beyond the N - 1 that N centred points span are zero."""
    rng = np.random.default_rng(0)
    wide = (rng.normal(size=(30, 400)) * np.linspace(3, 0.1, 400)).astype(np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(projection, "_axes_from_gram", projection._axes_from_covariance)
        by_covariance = {k: pca(wide, k) for k in (2, 50)}

    def no_covariance(centred: np.ndarray, dimensions: int) -> np.ndarray:
        raise AssertionError(f"a {centred.shape[1]} x {centred.shape[1]} covariance")

    monkeypatch.setattr(projection, "_axes_from_covariance", no_covariance)
    for k, expected in by_covariance.items():
        np.testing.assert_allclose(pca(wide, k), expected, atol=1e-4 * np.abs(expected).max())
    assert not pca(wide, 50)[:, 29:].any()


def test_many_points_and_dimensions_get_their_top_axes_from_a_seeded_randomized_svd(
    monkeypatch,
):
    """Above EXACT_PCA_LIMIT points and dimensions both (lowered here) the top axes come from
    a randomized SVD: the same map twice, and the exact map's leading axes, signs included."""
    rng = np.random.default_rng(0)
    spread = np.r_[10.0, 5.0, np.full(398, 0.5)]  # two clear axes, then noise
    wide = (rng.normal(size=(300, 400)) * spread).astype(np.float32)
    exact = pca(wide, 2)

    def no_eigh(centred: np.ndarray, dimensions: int) -> np.ndarray:
        raise AssertionError("an exact eigendecomposition")

    monkeypatch.setattr(projection, "EXACT_PCA_LIMIT", 100)
    monkeypatch.setattr(projection, "_axes_from_covariance", no_eigh)
    monkeypatch.setattr(projection, "_axes_from_gram", no_eigh)
    randomized = pca(wide, 2)
    np.testing.assert_array_equal(randomized, pca(wide, 2))
    for axis in range(2):
        assert np.corrcoef(randomized[:, axis], exact[:, axis])[0, 1] > 0.99


def test_a_projection_callable_with_the_wrong_shape_is_reported():
    """A backend that returns the wrong shape gets a clear error."""
    points, _ = _clusters(20)
    with pytest.raises(ValueError, match=r"returned shape \(20, 3\); expected \(20, 2\)"):
        project(points, method=lambda e, init: e[:, :3])


def test_wandb_table_is_capped_at_max_points_even_without_a_map(tmp_path: Path):
    """No embeddings map: W&B still gets at most max_points rows, every candidate among them."""
    train, val = loaders(num_val=60, flip=8)
    logger = WandbLogger(project="cap", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection="none", max_points=20, max_candidates=5)
    Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, val
    )
    (table,) = (offline_run_dir(tmp_path) / "files/media/table/labelwatch").glob("samples_*")
    data = json.loads(table.read_text())
    frame = pd.DataFrame(data["data"], columns=data["columns"])
    candidates = pd.read_parquet(callback.last_output_dir / "candidates.parquet")
    assert len(frame) == 20
    assert set(candidates["sample_id"]) <= set(frame["sample_id"])
    assert len(pd.read_parquet(callback.last_output_dir / "samples.parquet")) == 60


def test_umaps_compiled_code_is_kept_on_disk():
    """Compilation is paid once per machine: after a map, numba's cache holds umap-learn's
    functions (they do not ask for it themselves)."""
    from numba.core.caching import NullCache
    from umap.umap_ import smooth_knn_dist

    points, _ = _clusters(64)
    project(points, method="umap")
    assert not isinstance(smooth_knn_dist._cache, NullCache)
    cache_dir = Path(smooth_knn_dist._cache._cache_path)
    assert any(path.name.startswith("umap_.smooth_knn_dist") for path in cache_dir.glob("*.nbi"))


def test_the_worker_loads_umap_from_numbas_cache_without_pandas():
    """The worker's import of umap-learn costs less CPU: the functions compiled as its
    modules load come from numba's disk cache (umap-learn asks for none for two of them,
    whose compilation costs 0.3 s), and pandas, which scikit-learn would import, stays out.
    Two workers in turn: the first fills the cache where it is empty."""
    for _ in range(2):
        worker = MapWorker(warm_up=False)
        try:
            found = worker._pool.submit(umap_as_the_worker_imports_it).result(timeout=300)
        finally:
            worker.shutdown()
    assert found["compiled"] > 10
    assert found["uncached"] == []
    assert not found["pandas"]


def test_outside_the_worker_scikit_learn_keeps_pandas():
    """Only the map worker keeps pandas out: in a fresh process that maps, scikit-learn
    still recognises DataFrames."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from labelwatch.projection import project\n"
        "project(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))\n"
        "import sklearn.utils.fixes\n"
        "assert sklearn.utils.fixes.pd is not None\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


WORKER_SCRIPT = """
import pathlib, sys
import numpy as np
from lightning.pytorch import Trainer
from labelwatch import LabelWatch
from tests.helpers import TinyClassifier, loaders, trainer_kwargs

if __name__ == "__mp_main__":  # imported by a spawned child process
    pathlib.Path(sys.argv[1], "imported-by-a-child").touch()


def flat_map(embeddings, init):
    return np.stack([embeddings[:, 0], embeddings[:, 1]], axis=1)


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    projection = flat_map if sys.argv[2] == "script" else sys.argv[2]
    callback = LabelWatch(projection=projection, dirpath=out / "labelwatch")
    train, val = loaders()
    Trainer(**trainer_kwargs(out, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, val
    )
"""


@pytest.mark.parametrize(("projection", "imports_script"), [("umap", False), ("script", True)])
def test_the_worker_imports_the_training_script_only_for_a_function_defined_there(
    tmp_path: Path, projection: str, imports_script: bool
):
    """Importing the user's script costs the worker seconds of CPU; it is needed only to
    find a projection function defined in it, which then maps as usual."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(WORKER_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), projection],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "imported-by-a-child").exists() == imports_script
    samples = pd.read_parquet(tmp_path / "labelwatch" / "epoch=0" / "samples.parquet")
    assert samples["x"].notna().all() and samples["y"].notna().all()


def test_the_map_worker_runs_one_thread_at_a_lower_priority():
    """The worker leaves the cores to training: niceness 10 and one thread in numpy's BLAS
    and in the libraries it loads later (OpenMP, numba)."""
    worker = MapWorker(warm_up=False)
    try:
        found = worker._pool.submit(worker_threads).result(timeout=120)
    finally:
        worker.shutdown()
    assert found["nice"] >= 10
    assert found["pools"] and set(found["pools"]) == {1}
    assert found["env"] == dict.fromkeys(WORKER_THREAD_VARIABLES, "1")


class _CountingMedia:
    """A media_fn that counts its calls and finds no file."""

    def __init__(self) -> None:
        self.calls = 0
        self.key = "path"

    def __call__(self, row):
        self.calls += 1
        return None


def test_wandb_tables_and_media_stay_bounded_when_most_samples_are_candidates(tmp_path: Path):
    """More candidates than max_points (an untrained model flags most samples): the W&B
    candidates table keeps the top max_points, media are made only for rows W&B shows, and
    a media_fn that finds nothing is warned about; the local files keep every candidate."""
    train, val = loaders(num_val=60, flip=30)
    logger = WandbLogger(project="cap", save_dir=str(tmp_path), offline=True)
    media = _CountingMedia()
    callback = LabelWatch(
        projection="none", max_points=6, media_fn=media, metadata_keys=["path"], max_media_rows=2
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=1))
    with pytest.warns(
        UserWarning,
        match=r"media_fn gave no media for (\d+) of the \1 rows it"
        r" was asked for \(the first: path='audio/",
    ):
        trainer.fit(TinyClassifier(lr=0.0), train, val)
    finish_wandb()
    local = pd.read_parquet(callback.last_output_dir / "candidates.parquet")
    assert len(local) > 6
    (table,) = (offline_run_dir(tmp_path) / "files/media/table/labelwatch").glob("candidates_*")
    data = json.loads(table.read_text())
    logged = pd.DataFrame(data["data"], columns=data["columns"])
    assert logged["sample_id"].tolist() == local["sample_id"].head(6).tolist()
    assert media.calls <= 6 + 2
    with pytest.warns(UserWarning, match=f"holds the top 6 of the {len(local)} candidates"):
        assert len(load_candidates(offline_run_dir(tmp_path))) == 6


def test_a_stuck_map_worker_is_stopped_and_fit_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The first map never finishes (a deadlocked worker): at fit end the wait gives up
    after the worker's patience, stops it, and writes and logs every epoch without
    coordinates, instead of hanging the fit."""
    from labelwatch import projection

    monkeypatch.setenv("LABELWATCH_TEST_GATE", str(tmp_path / "never"))
    monkeypatch.setattr(projection, "MIN_MAP_PATIENCE_S", 2.0)
    train, val = loaders()
    logger = WandbLogger(project="maps", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection=gated_projection, map_in_background=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=2))
    with pytest.warns(UserWarning, match=r"did not finish epoch 0's map in \d+ s"):
        trainer.fit(TinyClassifier(), train, val)
    finish_wandb()
    _assert_logged_without_maps(callback, tmp_path, epochs=2)


def test_a_waiting_map_is_dropped_only_for_a_newer_epoch_of_its_dataloader():
    """With two dataloaders the queue interleaves them: a map waits behind the other
    dataloader's newer epoch without being overtaken (it was cancelled, and its dataloader
    lost every other map)."""
    from concurrent.futures import Future

    from labelwatch.callback import _PendingEpoch

    watch = LabelWatch()
    queue = [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a")]
    for epoch, name in queue:
        pending = _PendingEpoch(epoch, epoch, name, pd.DataFrame(), pd.DataFrame(), {})
        pending.map = Future()
        watch._pending.append(pending)
    with pytest.warns(UserWarning, match="maps are slower"):
        watch._drop_stale_maps()
    dropped = [(p.epoch, p.name) for p in watch._pending if p.map is None]
    assert dropped == [(0, "b"), (1, "a")]  # not the first (running), nor each newest


def test_the_worker_keeps_no_finished_maps():
    """Each finished map's future held its coordinates and ids for the rest of the fit: a
    long fit kept every epoch's map in memory."""
    points = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    worker = MapWorker(warm_up=False)
    try:
        for epoch in range(3):
            worker.submit(MapJob(epoch, list(range(50)), points, {}, "pca", 0)).result()
        worker.submit(MapJob(3, list(range(50)), points, {}, "pca", 0)).result()
        assert len(worker._futures) == 1  # only the newest, until the next submission
    finally:
        worker.shutdown()
