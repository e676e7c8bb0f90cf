"""Ready-made media callables: images from paths land in the W&B table of a real run."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from labelwatch import LabelWatch
from labelwatch.media import ImageFromPath
from tests.helpers import (
    BlobDataset,
    TinyClassifier,
    finish_wandb,
    loaders,
    offline_run_dir,
    run_table_files,
    trainer_kwargs,
    wandb_records,
)


class WithImages(BlobDataset):
    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "path": f"img/{index}.png"}


def _image_fit(tmp_path: Path, max_media_rows: int) -> Callable[[], None]:
    """48 validation samples with an 8x8 PNG each under tmp_path/images, and a 1-epoch
    Trainer logging their media to an offline W&B run; returns its fit."""
    from PIL import Image

    (tmp_path / "images/img").mkdir(parents=True)
    for index in range(48):
        Image.new("RGB", (8, 8), (index * 5, 0, 0)).save(tmp_path / f"images/img/{index}.png")
    torch.manual_seed(0)
    train, _ = loaders()
    val = DataLoader(WithImages(48, seed=2, flip=6), batch_size=16)
    callback = LabelWatch(
        projection="none",
        metadata_keys=["path"],
        media_fn=ImageFromPath(root=tmp_path / "images"),
        max_media_rows=max_media_rows,
    )
    logger = WandbLogger(project="media", save_dir=str(tmp_path), offline=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=1))
    return lambda: trainer.fit(TinyClassifier(lr=0.2), train, val)


def test_image_media_for_every_candidate_land_in_the_wandb_table(tmp_path: Path, _wandb_offline):
    """ImageFromPath puts a wandb.Image cell in the per-sample table for each candidate and
    for `max_media_rows` other rows; the run_table artifact W&B writes holds the images."""
    fit = _image_fit(tmp_path, max_media_rows=5)
    fit()
    finish_wandb()
    (files,) = run_table_files(offline_run_dir(tmp_path), "labelwatch/samples.table.json")
    table = json.loads(files["labelwatch/samples.table.json"].read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    with_media = [row for row in rows if row["media"] is not None]
    candidates = [row for row in rows if row["is_candidate"]]
    assert candidates and len(with_media) == len(candidates) + 5
    for row in with_media:
        assert row["media"]["_type"] == "image-file"
        assert files[row["media"]["path"]].stat().st_size > 0  # the staged PNG


def test_bad_media_rows_are_skipped_and_the_rest_of_the_epoch_is_logged(
    tmp_path: Path, _wandb_offline
):
    """An unreadable image and missing files cost only their own cells: the tables, the
    metrics and the artifact are logged, and each kind of problem is warned about."""
    fit = _image_fit(tmp_path, max_media_rows=48)
    (tmp_path / "images/img/7.png").write_bytes(b"not an image")
    for index in (8, 9):
        (tmp_path / f"images/img/{index}.png").unlink()
    with pytest.warns(UserWarning) as record:
        fit()
    finish_wandb()
    messages = [str(w.message) for w in record]
    assert not [m for m in messages if "could not log to W&B" in m]
    (failed,) = [m for m in messages if "media_fn failed" in m]
    assert "failed for 1 of 48 rows (the first: sample 1007, UnidentifiedImageError" in failed
    (missing,) = [m for m in messages if "gave no media" in m]
    assert "for 2 of the 48 rows it was asked for (the first: path='img/8.png')" in missing
    (table,) = run_table_files(offline_run_dir(tmp_path), "labelwatch/samples.table.json")
    data = json.loads(table["labelwatch/samples.table.json"].read_text())
    logged = pd.DataFrame(data["data"], columns=data["columns"])
    assert sorted(logged.loc[logged["media"].isna(), "sample_id"]) == [1007, 1008, 1009]
    assert logged["media"].notna().sum() == 45
    (log_file,) = offline_run_dir(tmp_path).glob("*.wandb")
    artifacts = [r.artifact.type for r in wandb_records(log_file) if r.HasField("artifact")]
    assert "relabel-candidates" in artifacts


def test_a_media_fn_result_that_is_not_wandb_media_is_left_out_with_a_warning():
    """A waveform returned as a list (instead of wandb.Audio) would fail the whole table."""
    callback = LabelWatch(media_fn=lambda row: [0.0, 1.0] if row["sample_id"] == 2 else None)
    samples = pd.DataFrame({"sample_id": [1, 2, 3], "is_candidate": False, "label_quality": 0.5})
    with pytest.warns(
        UserWarning,
        match=r"media_fn failed for 1 of 3 rows \(the first: sample"
        r" 2, it returned a list, not W&B media such as wandb.Audio",
    ):
        media = callback._media(samples, samples.head(0))
    assert media == {1: None, 2: None, 3: None}


def test_image_from_path_without_pillow_says_what_to_install(monkeypatch):
    """Without Pillow, wandb.Image cannot read a file: fail at construction, not every epoch."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'labelwatch\[images\]'"):
        ImageFromPath(root=".")


def test_the_caption_names_the_label_and_the_suggestion():
    """The suggestion may be the neighbours' or a watched class's: not put on the model."""
    from labelwatch.media import AudioFromPath

    media = AudioFromPath()
    row = {"sample_id": "7", "given_name": "dog_bark", "suggested_name": "siren"}
    assert media.caption(row) == "7: labelled dog_bark, suggested siren"
    assert media.caption(row | {"suggested_name": "dog_bark"}) == "7: labelled dog_bark"


def test_the_media_budget_goes_to_the_rows_most_likely_wrong_first():
    """max_media_rows went to the lowest ids; it now goes to the flagged rows that
    max_candidates left out, then to the lowest label_quality."""
    import wandb

    callback = LabelWatch(media_fn=lambda row: wandb.Html(str(row["sample_id"])), max_media_rows=3)
    samples = pd.DataFrame(
        {
            "sample_id": [1, 2, 3, 4, 5, 6],
            "is_candidate": [False, False, True, False, True, True],
            "label_quality": [0.9, 0.1, 0.3, 0.5, 0.2, 0.05],
        }
    )
    media = callback._media(samples, samples[samples["sample_id"] == 6])
    assert sorted(i for i, medium in media.items() if medium is not None) == [2, 3, 5, 6]


def test_audio_files_that_hold_no_audio_are_failures_and_linked_files_keep_their_names(
    tmp_path: Path,
):
    """wandb.Audio copies a file without reading it: a corrupt or empty .wav became an
    unplayable cell with no warning. A clip that links into a blob store (the Hugging Face
    cache) was refused as outside root, once resolved."""
    import numpy as np
    import soundfile

    from labelwatch.media import AudioFromPath

    audio, store = tmp_path / "audio", tmp_path / "store"
    audio.mkdir(), store.mkdir()
    soundfile.write(store / "blob", np.zeros(800, dtype=np.float32), 8000, format="WAV")
    (audio / "linked.wav").symlink_to(store / "blob")
    (audio / "corrupt.wav").write_bytes(b"RIFF" + bytes(60))
    (audio / "empty.wav").write_bytes(b"")
    (audio / "clip.m4a").write_bytes(b"not read here")  # a format soundfile does not read
    media = AudioFromPath(root=audio)
    linked = media({"path": "linked.wav", "sample_id": 1})
    assert linked is not None and linked._path.endswith(".wav")
    for name in ("corrupt.wav", "empty.wav"):
        with pytest.raises((RuntimeError, ValueError)):
            media({"path": name, "sample_id": 2})
    assert media({"path": "clip.m4a", "sample_id": 3}) is not None
    assert media({"path": "../store/blob", "sample_id": 4}) is None


class _SlowMedia:
    """A media_fn that waits for a gate file on its first call, then takes 50 ms a row."""

    def __init__(self, gate: Path) -> None:
        self.gate, self.calls = gate, 0

    def __call__(self, row: dict) -> object:
        import time

        import wandb

        while not self.gate.exists():
            time.sleep(0.01)
        self.calls += 1
        time.sleep(0.05)
        return wandb.Html(str(row["sample_id"]))


class _FailsAfterTwoValidations(TinyClassifier):
    def __init__(self, gate: Path) -> None:
        super().__init__()
        self.gate = gate

    def training_step(self, batch: dict, batch_idx: int):
        if self.current_epoch == 1:
            self.gate.touch()  # the first epoch's logging goes on making its media
            raise RuntimeError("interrupted, say")
        return super().training_step(batch, batch_idx)


def test_after_an_interrupt_the_epochs_waiting_to_be_logged_go_without_media(tmp_path: Path):
    """A slow media_fn held a Ctrl-C for as long as the queued epochs' media took (80 s in
    a tester's run): the epoch being logged finishes, the ones waiting go without media."""
    gate = tmp_path / "gate"
    media = _SlowMedia(gate)
    train, val = loaders()
    logger = WandbLogger(project="media", save_dir=str(tmp_path), offline=True)
    watch = LabelWatch(projection="none", media_fn=media, max_media_rows=48)
    kwargs = trainer_kwargs(tmp_path, logger=logger, callbacks=[watch], val_check_interval=0.5)
    with pytest.raises(RuntimeError, match="interrupted, say"):
        Trainer(**kwargs).fit(_FailsAfterTwoValidations(gate), train, val)
    finish_wandb()
    assert media.calls == 48  # the first validation's rows only
    tables = run_table_files(offline_run_dir(tmp_path), "labelwatch/samples.table.json")
    logged = [json.loads(t["labelwatch/samples.table.json"].read_text()) for t in tables]
    with_media = [
        pd.DataFrame(t["data"], columns=t["columns"]).get("media", pd.Series()).notna().sum()
        for t in logged
    ]
    assert sorted(with_media) == [0, 48]
