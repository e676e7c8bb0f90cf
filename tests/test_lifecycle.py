"""Resume from a checkpoint, several validation dataloaders, and the pytorch_lightning package."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from labelwatch import LabelWatch
from tests.helpers import BlobDataset, ClassifierSteps, TinyClassifier, trainer_kwargs


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


def test_resume_matches_an_uninterrupted_run(tmp_path: Path):
    """Stop after epoch 1, resume to epoch 3: same epochs, rows and scores as one run."""
    train, val = _data()
    torch.manual_seed(0)
    full = LabelWatch(projection="pca")
    Trainer(**trainer_kwargs(tmp_path / "full", callbacks=[full], max_epochs=4)).fit(
        TinyClassifier(), train, val
    )

    torch.manual_seed(0)
    first = LabelWatch(projection="pca")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path / "resumed", max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [first, checkpoint]}).fit(TinyClassifier(), train, val)
    state = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("LabelWatch")]
    assert saved == {"last_epoch": 1, "output_root": str(tmp_path / "resumed/labelwatch")}

    # The resumed run's own default folder differs; the outputs continue where they were.
    second = LabelWatch(projection="pca")
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
    histories = sorted((tmp_path / "resumed/labelwatch").glob("*/history.parquet"))
    assert [p.parent.name for p in histories] == ["epoch=3"]
    assert not (tmp_path / "elsewhere/labelwatch").exists()
    assert second.last_epoch == 3


def test_resume_with_another_history_window_restarts_the_average(tmp_path: Path):
    """A saved history whose window differs from `history_window` is not reused: a warning,
    and the averaging starts again at the resumed epoch."""
    train, val = _data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    Trainer(**{**kwargs, "callbacks": [LabelWatch(projection="none"), checkpoint]}).fit(
        TinyClassifier(), train, val
    )
    callback = LabelWatch(projection="none", history_window=2)
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"does not match `history_window`=2 at epoch 1"):
        Trainer(
            **{**kwargs, "callbacks": [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")]}
        ).fit(TinyClassifier(), train, val, ckpt_path=tmp_path / "ckpt/last.ckpt")
    resumed = pd.read_parquet(tmp_path / "labelwatch/epoch=2/samples.parquet")
    assert resumed["averaged_epochs"].eq(1).all()


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
