"""Resume from a checkpoint, several validation dataloaders, and the pytorch_lightning package."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from labelwatch import LabelWatch
from tests.helpers import (
    BlobDataset,
    ClassifierSteps,
    TinyClassifier,
    finish_wandb,
    offline_run_dirs,
    trainer_kwargs,
    wandb_records,
)


def _data() -> tuple[DataLoader, DataLoader]:
    # Unshuffled training data: an interrupted run replays exactly the same batches.
    train = DataLoader(BlobDataset(64, seed=1), batch_size=16)
    val = DataLoader(BlobDataset(30, seed=2, flip=5), batch_size=10)
    return train, val


def _epochs(root: Path) -> dict[int, pd.DataFrame]:
    return {
        int(p.name.split("=")[1]): pd.read_parquet(p / "samples.parquet")
        for p in sorted(root.glob("epoch=*"))
    }


@pytest.mark.parametrize("history_top_k", [10, 1])
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, history_top_k: int):
    """Stop after epoch 1, resume to epoch 3: same epochs, rows and scores (the first
    epoch's watch scores included) as one run (with whole vectors in the epoch history, and
    with each past epoch's top class only)."""
    settings = dict(projection="pca", history_top_k=history_top_k, watch_classes=[1])
    train, val = _data()
    torch.manual_seed(0)
    full = LabelWatch(**settings)
    Trainer(**trainer_kwargs(tmp_path / "full", callbacks=[full], max_epochs=4)).fit(
        TinyClassifier(), train, val
    )

    torch.manual_seed(0)
    first = LabelWatch(**settings)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path / "resumed", max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [first, checkpoint]}).fit(TinyClassifier(), train, val)
    state = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("LabelWatch")]
    assert saved == {
        "last_epoch": 1,
        "last_run": 1,
        "output_root": str(tmp_path / "resumed/labelwatch"),
        "output_root_absolute": str(tmp_path / "resumed/labelwatch"),
    }

    # The resumed run's own default folder differs; the outputs continue where they were.
    second = LabelWatch(**settings)
    kwargs = trainer_kwargs(tmp_path / "elsewhere", max_epochs=4, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [second, ModelCheckpoint(dirpath=tmp_path / "ckpt")]}).fit(
        TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/last.ckpt"
    )
    resumed, uninterrupted = (
        _epochs(tmp_path / "resumed/labelwatch"),
        _epochs(tmp_path / "full/labelwatch"),
    )
    assert sorted(resumed) == sorted(uninterrupted) == [0, 1, 2, 3]
    for epoch in range(4):
        pd.testing.assert_frame_equal(resumed[epoch], uninterrupted[epoch], check_exact=False)
    # the 3-epoch averaging window continued from the history saved before the stop
    assert resumed[2]["averaged_epochs"].eq(3).all()
    # and the first watch scores are those of epoch 0 (read back from its last epoch's files)
    first = resumed[0].set_index("sample_id")["watch_1"]
    later = resumed[3].set_index("sample_id")["first_watch_1"]
    pd.testing.assert_series_equal(later, first, check_names=False)
    histories = sorted((tmp_path / "resumed/labelwatch").glob("*/history.arrow"))
    assert [p.parent.name for p in histories] == ["epoch=3"]
    assert not (tmp_path / "elsewhere/labelwatch").exists()
    assert second.last_epoch == 3


def _fit(tmp_path: Path, watch: LabelWatch, root: Path, resume: bool = False) -> None:
    """Two epochs with checkpoints, or with `resume` from the last one to four."""
    train, val = _data()
    if not resume:
        torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(root, max_epochs=4 if resume else 2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [watch, checkpoint]}).fit(
        TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/last.ckpt" if resume else None
    )


class _HistoryAtCheckpoints(Callback):
    """Takes LabelWatch's checkpoint state after each validation, as ModelCheckpoint does,
    and notes whether the history of the epoch it counts is on disk by then."""

    def __init__(self, watch: LabelWatch) -> None:
        self.watch, self.on_disk = watch, []

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.watch.state_dict()
            self.on_disk.append((self.watch.last_output_dir / "history.arrow").is_file())


def test_a_checkpoint_waits_for_the_history_of_the_epoch_it_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The history is written on a thread: a checkpoint taken meanwhile counted an epoch
    whose history a kill could lose, and its resume restarted the average."""
    import time

    from labelwatch.history import EpochHistory

    save = EpochHistory.save

    def slow_save(self, path):
        time.sleep(0.5)
        return save(self, path)

    monkeypatch.setattr(EpochHistory, "save", slow_save)
    train, val = _data()
    watch = LabelWatch(projection="none")
    probe = _HistoryAtCheckpoints(watch)
    Trainer(**trainer_kwargs(tmp_path, callbacks=[watch, probe], max_epochs=2)).fit(
        TinyClassifier(), train, val
    )
    assert probe.on_disk == [True, True]


def test_resume_with_dirpath_matches_an_uninterrupted_run(tmp_path: Path):
    """With `dirpath=`, the resumed fit read nothing back (it scored before it knew its
    folder): flag streaks, first watch scores and the history started again, unwarned."""
    settings = dict(projection="pca", watch_classes=[1], dirpath=tmp_path / "out")
    train, val = _data()
    torch.manual_seed(0)
    full = LabelWatch(**{**settings, "dirpath": tmp_path / "full"})
    Trainer(**trainer_kwargs(tmp_path, callbacks=[full], max_epochs=4)).fit(
        TinyClassifier(), train, val
    )
    _fit(tmp_path, LabelWatch(**settings), tmp_path / "run")
    _fit(tmp_path, LabelWatch(**settings), tmp_path / "run", resume=True)
    resumed, uninterrupted = _epochs(tmp_path / "out"), _epochs(tmp_path / "full")
    assert sorted(resumed) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(resumed[3], uninterrupted[3], check_exact=False)


def test_a_class_watched_since_the_resume_keeps_the_others_first_scores(tmp_path: Path):
    """Adding a watched class on resume threw away the first scores of the classes watched
    before (the file lacks the new class's column): they are kept, and the new class's
    first scores are those of the resumed fit's first epoch."""
    _fit(tmp_path, LabelWatch(projection="pca", watch_classes=[1]), tmp_path / "run")
    resumed = LabelWatch(projection="pca", watch_classes=[1, 0])
    _fit(tmp_path, resumed, tmp_path / "run", resume=True)
    epochs = {e: f.set_index("sample_id") for e, f in _epochs(resumed.output_root).items()}
    first_1, first_0 = epochs[3]["first_watch_1"], epochs[3]["first_watch_0"]
    pd.testing.assert_series_equal(first_1, epochs[0]["watch_1"], check_names=False)
    pd.testing.assert_series_equal(first_0, epochs[2]["watch_0"], check_names=False)


def test_a_resume_after_the_run_folder_moved_continues_in_the_new_folder(tmp_path: Path):
    """The run folder (an absolute default_root_dir) was moved before the resume: the
    outputs continue in the Trainer's new folder, with what the samples carry, instead of
    recreating the old path."""
    import shutil

    _fit(tmp_path, LabelWatch(projection="pca"), tmp_path / "before")
    shutil.move(tmp_path / "before", tmp_path / "after")
    _fit(tmp_path, LabelWatch(projection="pca"), tmp_path / "after", resume=True)
    assert not (tmp_path / "before").exists()
    epochs = _epochs(tmp_path / "after/labelwatch")
    assert sorted(epochs) == [0, 1, 2, 3]
    assert epochs[2]["averaged_epochs"].eq(3).all()  # the history was read back


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"history_window": 2}, r"\(window 3, top_k 10, .*`history_window`=2, `history_top_k`=10"),
        ({"history_top_k": 1}, r"\(window 3, top_k 10, .*`history_window`=3, `history_top_k`=1"),
    ],
)
def test_resume_with_another_history_window_restarts_the_average(
    tmp_path: Path, changed: dict, message: str
):
    """A saved history whose window differs from `history_window`, or that keeps its
    vectors otherwise than `history_top_k` would (C = 3: whole vectors, against the top
    class only), is not reused: a warning, and the averaging starts again at the resumed
    epoch."""
    train, val = _data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none"), checkpoint]}).fit(
        TinyClassifier(), train, val
    )
    callback = LabelWatch(projection="none", **changed)
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=message + " at run 1"):
        Trainer(
            **{**kwargs, "callbacks": [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")]}
        ).fit(TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/last.ckpt")
    resumed = pd.read_parquet(tmp_path / "labelwatch/epoch=2/samples.parquet")
    assert resumed["averaged_epochs"].eq(1).all()


def test_resume_from_an_older_checkpoint_says_why_the_average_restarts(tmp_path: Path):
    """Only the newest epoch's folder keeps the history file: a resume from an older
    checkpoint (the best one, say) warns that the averaging restarts, and why."""
    train, val = _data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # one per epoch
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none"), checkpoint]}).fit(
        TinyClassifier(), train, val
    )
    (first,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    with pytest.warns(UserWarning, match="only the newest epoch's folder keeps it: was this"):
        Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none")]}).fit(
            TinyClassifier(), train, val, ckpt_path=first
        )
    resumed = pd.read_parquet(tmp_path / "labelwatch/epoch=1/samples.parquet")
    assert resumed["averaged_epochs"].eq(1).all()


def test_a_resume_started_in_another_working_directory_finds_the_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A logger's relative save_dir makes the output folder relative: a resume launched
    from elsewhere continues the folder where it is, and one that moved with the run (the
    relative path exists from here) continues that one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    written = LabelWatch()
    written.output_root = Path("runs/labelwatch")
    (tmp_path / "runs/labelwatch").mkdir(parents=True)
    state = written.state_dict()
    assert state["output_root_absolute"] == str(tmp_path / "runs/labelwatch")
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = LabelWatch()
    resumed.load_state_dict(state)
    assert resumed.output_root == tmp_path / "runs/labelwatch"
    (tmp_path / "elsewhere/runs/labelwatch").mkdir(parents=True)  # a copy of the run, here
    resumed.load_state_dict(state)
    assert resumed.output_root == Path("runs/labelwatch")


def test_a_resume_whose_last_samples_file_is_gone_says_what_starts_again(tmp_path: Path):
    """The streaks and first watch scores carried over a resume live in the last epoch's
    samples.parquet: without it they start again, with a warning instead of silence."""
    train, val = _data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none"), checkpoint]}).fit(
        TinyClassifier(), train, val
    )
    (tmp_path / "labelwatch/epoch=1/samples.parquet").unlink()
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"samples.parquet \(FileNotFoundError\): what samples"):
        Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none")]}).fit(
            TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/last.ckpt"
        )
    resumed = pd.read_parquet(tmp_path / "labelwatch/epoch=2/samples.parquet")
    assert resumed["flag_streak"].le(1).all()


def test_a_new_fit_into_a_folder_with_another_fits_epochs_writes_beside_it(tmp_path: Path):
    """A second script run (or a notebook retry) into the same folder would overwrite part
    of the first fit's epochs and leave the rest for readers to take as the latest: it
    writes to labelwatch-v1 with a warning, and the first fit's files stay as they were."""
    from labelwatch.candidates import read_candidates

    train, val = _data()
    Trainer(
        **trainer_kwargs(tmp_path, max_epochs=3, callbacks=[LabelWatch(projection="none")])
    ).fit(TinyClassifier(), train, val)
    first = {p: p.read_bytes() for p in (tmp_path / "labelwatch").rglob("*") if p.is_file()}
    callback = LabelWatch(projection="none")
    with pytest.warns(UserWarning, match="holds the epochs of another fit; this fit writes to"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[callback])).fit(
            TinyClassifier(), train, val
        )
    assert callback.output_root == tmp_path / "labelwatch-v1"
    assert sorted(p.name for p in callback.output_root.iterdir()) == ["epoch=0", "epoch=1"]
    assert {p: p.read_bytes() for p in (tmp_path / "labelwatch").rglob("*") if p.is_file()} == first
    assert read_candidates(callback.output_root).epoch == 1  # not the first fit's epoch 2


def test_each_validation_dataloader_is_watched_separately(tmp_path: Path):
    """Two named validation loaders get their own folders, named in the summary."""
    train, val = _data()
    other = DataLoader(BlobDataset(20, seed=3), batch_size=10)
    callback = LabelWatch(projection="none")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, {"noisy": val, "clean": other}
    )
    noisy = pd.read_parquet(tmp_path / "labelwatch/noisy/epoch=0/samples.parquet")
    clean = pd.read_parquet(tmp_path / "labelwatch/clean/epoch=0/samples.parquet")
    assert (len(noisy), len(clean)) == (30, 20)
    summary = pd.read_json(tmp_path / "labelwatch/clean/epoch=0/summary.json", typ="series")
    assert summary["dataloader"] == "clean"


def test_only_the_chosen_dataloaders_are_watched(tmp_path: Path):
    """dataloaders=[1] over a list of two loaders watches the second only."""
    train, val = _data()
    other = DataLoader(BlobDataset(20, seed=3), batch_size=10)
    callback = LabelWatch(projection="none", dataloaders=[1])
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, [val, other]
    )
    assert [p.name for p in (tmp_path / "labelwatch").iterdir()] == ["dataloader_1"]


def test_unknown_dataloader_names_are_a_clear_error(tmp_path: Path):
    """Choosing a dataloader that does not exist lists the ones that do."""
    train, val = _data()
    callback = LabelWatch(projection="none", dataloaders=["test"])
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1))
    with pytest.raises(ValueError, match=r"unknown validation dataloaders \['test'\]"):
        trainer.fit(TinyClassifier(), train, {"noisy": val})


def test_pytorch_lightning_package_trainer(tmp_path: Path):
    """labelwatch.pl.LabelWatch runs in a pytorch_lightning.Trainer."""
    pl = pytest.importorskip("pytorch_lightning")

    from labelwatch.pl import LabelWatch as PLLabelWatch

    class PLClassifier(ClassifierSteps, pl.LightningModule):
        pass

    train, val = _data()
    callback = PLLabelWatch(projection="pca", class_names=["a", "b", "c"])
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=2)).fit(
        PLClassifier(), train, val
    )
    samples = pd.read_parquet(tmp_path / "labelwatch/epoch=1/samples.parquet")
    assert len(samples) == 30 and set(samples["given_name"]) == {"a", "b", "c"}


def _candidate_artifacts(run_dir: Path) -> list[dict]:
    """Name, aliases, metadata and file digests of each relabel-candidates artifact record."""
    import json

    (log_file,) = run_dir.glob("run-*.wandb")
    return [
        {
            "name": r.artifact.name,
            "aliases": sorted(r.artifact.aliases),
            "metadata": json.loads(r.artifact.metadata),
            "digests": {e.path: e.digest for e in r.artifact.manifest.contents},
        }
        for r in wandb_records(log_file)
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "relabel-candidates"
    ]


def _md5(path: Path) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_resumed_wandb_run_continues_the_artifact_aliases(tmp_path: Path):
    """Stop after epoch 1 and resume the same W&B run id: the artifact goes on with epoch-2
    and epoch-3, and artifacts and local outputs match one uninterrupted run's."""
    from lightning.pytorch.loggers import WandbLogger

    train, val = _data()
    torch.manual_seed(0)
    full_dir = tmp_path / "full"
    logger = WandbLogger(project="resume", save_dir=str(full_dir), offline=True, id="lwfull")
    kwargs = trainer_kwargs(full_dir, max_epochs=4, logger=logger)
    Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none")]}).fit(
        TinyClassifier(), train, val
    )
    finish_wandb()  # the record log is complete only once the W&B service has closed it

    # The same logger settings twice, as a user relaunching the script: same folder, same id.
    torch.manual_seed(0)
    save_dir, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    for max_epochs, ckpt_path in ((2, None), (4, ckpt / "last.ckpt")):
        logger = WandbLogger(
            project="resume", save_dir=str(save_dir), offline=True, id="lwresume", resume="allow"
        )
        kwargs = trainer_kwargs(save_dir, max_epochs=max_epochs, enable_checkpointing=True)
        callbacks = [LabelWatch(projection="none"), ModelCheckpoint(dirpath=ckpt, save_last=True)]
        Trainer(**{**kwargs, "logger": logger, "callbacks": callbacks}).fit(
            TinyClassifier(), train, val, ckpt_path=ckpt_path
        )
        finish_wandb()

    # One offline folder per launch; the second holds only the epochs it ran.
    (full_run,) = offline_run_dirs(full_dir, "lwfull")
    runs = offline_run_dirs(save_dir, "lwresume")
    assert len(runs) == 2
    per_run = [_candidate_artifacts(run) for run in runs]
    assert [[a["aliases"] for a in artifacts] for artifacts in per_run] == [
        [["epoch-0", "latest"], ["epoch-1", "latest"]],
        [["epoch-2", "latest"], ["epoch-3", "latest"]],
    ]
    resumed = per_run[0] + per_run[1]
    uninterrupted = _candidate_artifacts(full_run)
    assert {a["name"] for a in resumed} == {"relabel-candidates-lwresume"}
    assert [a["aliases"] for a in uninterrupted] == [a["aliases"] for a in resumed]
    for epoch, (mine, reference) in enumerate(zip(resumed, uninterrupted, strict=True)):
        assert mine["metadata"]["epoch"] == epoch
        for key in ("num_samples", "num_candidates", "num_mismatches", "class_names"):
            assert mine["metadata"][key] == reference["metadata"][key]
        assert mine["metadata"]["thresholds"] == pytest.approx(reference["metadata"]["thresholds"])
        # W&B got the very files written locally for that epoch.
        local = save_dir / f"resume/lwresume/labelwatch/epoch={epoch}"
        for name in ("candidates.parquet", "candidates.csv"):
            assert mine["digests"][name] == _md5(local / name)

    # The local outputs continue in the first launch's folder and equal the uninterrupted run's.
    resumed_epochs = _epochs(save_dir / "resume/lwresume/labelwatch")
    full_epochs = _epochs(full_dir / "resume/lwfull/labelwatch")
    assert sorted(resumed_epochs) == sorted(full_epochs) == [0, 1, 2, 3]
    for epoch in range(4):
        pd.testing.assert_frame_equal(resumed_epochs[epoch], full_epochs[epoch], check_exact=False)


def test_a_checkpoint_without_last_run_falls_back_to_last_epoch():
    """Checkpoints without `last_run` keyed the history by epoch, which is the run count
    when every epoch was scored once: the epoch stands in for it."""
    callback = LabelWatch()
    callback.load_state_dict({"last_epoch": 4, "output_root": "outputs/labelwatch"})
    assert (callback.last_epoch, callback.last_run) == (4, 4)


def test_resume_into_a_new_wandb_run_names_that_runs_artifact(tmp_path: Path):
    """Resumed with a new W&B run (Lightning's default without `id=`): the local files stay in
    the first run's folder, and each epoch's summary names the run it was logged to, so
    reading the candidates back points at the artifact that exists."""
    from lightning.pytorch.loggers import WandbLogger

    from labelwatch.candidates import read_candidates

    train, val = _data()
    save_dir, ckpt = tmp_path / "runs", tmp_path / "ckpt"
    launches = (("lwfirst", 1, None), ("lwsecond", 2, ckpt / "last.ckpt"))
    for run_id, max_epochs, ckpt_path in launches:
        logger = WandbLogger(project="resume", save_dir=str(save_dir), offline=True, id=run_id)
        kwargs = trainer_kwargs(save_dir, max_epochs=max_epochs, enable_checkpointing=True)
        callbacks = [LabelWatch(projection="none"), ModelCheckpoint(dirpath=ckpt, save_last=True)]
        Trainer(**{**kwargs, "logger": logger, "callbacks": callbacks}).fit(
            TinyClassifier(), train, val, ckpt_path=ckpt_path
        )
        finish_wandb()
    outputs = save_dir / "resume/lwfirst/labelwatch"
    assert sorted(p.name for p in outputs.iterdir() if p.is_dir()) == ["epoch=0", "epoch=1"]
    first, resumed = read_candidates(outputs, epoch=0), read_candidates(outputs, epoch=1)
    assert first.artifact == "resume/relabel-candidates-lwfirst:epoch-0"
    assert (resumed.wandb_run_id, resumed.artifact) == (
        "lwsecond",
        "resume/relabel-candidates-lwsecond:epoch-1",
    )
    (second_run,) = offline_run_dirs(save_dir, "lwsecond")
    logged = _candidate_artifacts(second_run)
    assert [(a["name"], a["aliases"]) for a in logged] == [
        ("relabel-candidates-lwsecond", ["epoch-1", "latest"])
    ]


def test_a_resume_from_an_older_checkpoint_sets_the_later_epochs_aside(tmp_path: Path):
    """Four epochs, then a resume from epoch 1's checkpoint to three: epochs 2 and 3 of the
    first fit stayed beside the new ones, and readers took the stale epoch 3 for the
    latest. They are renamed abandoned-epoch=<n>, with a warning."""
    from labelwatch import load_candidates

    train, val = _data()
    every = dict(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True)
    first = LabelWatch(projection="none")
    Trainer(**{**kwargs, "max_epochs": 4, "callbacks": [first, ModelCheckpoint(**every)]}).fit(
        TinyClassifier(), train, val
    )
    resumed = LabelWatch(projection="none")
    with pytest.warns(UserWarning, match=r"holds epochs \[2, 3\] of the fit that went on"):
        Trainer(**{**kwargs, "max_epochs": 3, "callbacks": [resumed]}).fit(
            TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/epoch=1.ckpt"
        )
    names = sorted(p.name for p in (tmp_path / "labelwatch").iterdir())
    assert names == ["abandoned-epoch=2", "abandoned-epoch=3", "epoch=0", "epoch=1", "epoch=2"]
    assert load_candidates(tmp_path / "labelwatch")["epoch"].unique().tolist() == [2]


def test_a_resume_that_names_the_watched_dataloader_continues_the_fit(tmp_path: Path):
    """`dataloaders=[0]` added on resume changed the callback's state key: the checkpoint's
    state was not loaded, and the fit wrote to labelwatch-v1 from scratch."""
    _fit(tmp_path, LabelWatch(projection="none"), tmp_path / "run")
    resumed = LabelWatch(projection="none", dataloaders=[0])
    with pytest.warns(UserWarning, match="the fit continues from that state"):
        _fit(tmp_path, resumed, tmp_path / "run", resume=True)
    assert resumed.output_root == tmp_path / "run/labelwatch"
    assert sorted(_epochs(resumed.output_root)) == [0, 1, 2, 3]
    assert _epochs(resumed.output_root)[2]["averaged_epochs"].eq(3).all()
