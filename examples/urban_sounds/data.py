"""UrbanSound8K data for the urban-sounds example: a Dataset and a LightningDataModule.

Works unchanged on the real UrbanSound8K (44.1/48 kHz, mono or stereo, 8/16/24-bit,
clips of up to 4 s) and on the synthetic stand-in of :mod:`examples.urban_sounds.generate`,
both laid out as::

    ROOT/audio/fold<k>/<slice_file_name>
    ROOT/metadata/UrbanSound8K.csv   slice_file_name, fsID, start, end, salience, fold,
                                     classID, class

Every clip is read with soundfile, mixed down to mono, resampled to ``sample_rate`` when
its rate differs, and cropped or zero-padded to ``clip_seconds``. Clips are loaded into
memory once (3000 synthetic clips of 2 s at 16 kHz take 0.4 GB and a few seconds).

Items are dicts, which the default collate function batches::

    {"waveform": FloatTensor[T], "target": classID, "sample_id": slice_file_name,
     "path": "fold<k>/<slice_file_name>"}    # relative to ROOT/audio

``sample_id`` is a stable id for LabelWatch; ``path`` travels as LabelWatch metadata, so
``labelwatch.media.AudioFromPath(root=ROOT/audio)`` can put the clip in the W&B table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from examples.urban_sounds.generate import CLASS_NAMES

__all__ = ["METADATA_FILE", "UrbanSoundDataModule", "UrbanSoundDataset", "load_clip"]

METADATA_FILE = Path("metadata") / "UrbanSound8K.csv"


def load_clip(path: str | Path, sample_rate: int, num_samples: int) -> torch.Tensor:
    """One audio file as a mono float tensor of ``num_samples`` samples at ``sample_rate``.

    Channels are averaged, the signal is resampled when its rate differs, then cropped
    (the start is kept) or zero-padded at the end.
    """
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    waveform = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != sample_rate:
        waveform = AF.resample(waveform, orig_freq=rate, new_freq=sample_rate)
    if len(waveform) >= num_samples:
        return waveform[:num_samples].clone()
    return torch.nn.functional.pad(waveform, (0, num_samples - len(waveform)))


class UrbanSoundDataset(Dataset):
    """The clips of some folds of an UrbanSound8K-layout folder, preloaded in memory.

    Args:
        root: folder holding ``audio/`` and ``metadata/UrbanSound8K.csv``.
        folds: folds to include (None = all).
        sample_rate: target sample rate in Hz.
        clip_seconds: every waveform is cropped or padded to this length.
    """

    def __init__(
        self,
        root: str | Path,
        folds: Sequence[int] | None = None,
        *,
        sample_rate: int = 16000,
        clip_seconds: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.sample_rate = sample_rate
        self.num_samples = round(clip_seconds * sample_rate)
        metadata = read_metadata(self.root)
        if folds is not None:
            metadata = metadata[metadata["fold"].isin(list(folds))]
        self.metadata = metadata.reset_index(drop=True)
        folds_names = zip(self.metadata["fold"], self.metadata["slice_file_name"], strict=True)
        self.paths = [f"fold{fold}/{name}" for fold, name in folds_names]
        self.targets = torch.as_tensor(
            self.metadata["classID"].to_numpy(copy=True), dtype=torch.long
        )
        self.waveforms = torch.zeros(len(self.paths), self.num_samples)
        for i, path in enumerate(self.paths):
            self.waveforms[i] = load_clip(
                self.root / "audio" / path, self.sample_rate, self.num_samples
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "waveform": self.waveforms[index],
            "target": int(self.targets[index]),
            "sample_id": str(self.metadata["slice_file_name"].iat[index]),
            "path": self.paths[index],
        }


def read_metadata(root: str | Path) -> pd.DataFrame:
    """``ROOT/metadata/UrbanSound8K.csv`` with a clear error when it is missing."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: point `root` at an UrbanSound8K folder, or let"
            " UrbanSoundDataModule.prepare_data() generate the synthetic one."
        )
    return pd.read_csv(path)


class UrbanSoundDataModule(LightningDataModule):
    """UrbanSound8K folds as train/validation loaders; makes synthetic data when missing.

    Args:
        root: UrbanSound8K folder. When ``metadata/UrbanSound8K.csv`` is missing,
            :meth:`prepare_data` writes the synthetic stand-in there.
        val_folds: folds of the validation set; the other folds train.
        batch_size: clips per batch.
        num_workers: DataLoader workers (clips are in memory: 0 is usually fastest).
        sample_rate: target sample rate in Hz.
        clip_seconds: clip length after cropping/padding (real clips are up to 4 s).
        generate_clips: number of synthetic clips to generate when data is missing.
        seed: seed of the synthetic data.
    """

    def __init__(
        self,
        root: str = "data/urban_sounds",
        val_folds: list[int] = [8, 9, 10],  # noqa: B006 - shown as the default by LightningCLI
        batch_size: int = 32,
        num_workers: int = 0,
        sample_rate: int = 16000,
        clip_seconds: float = 2.0,
        generate_clips: int = 3000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.val_folds = list(val_folds)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.generate_clips = generate_clips
        self.seed = seed
        self.train_set: UrbanSoundDataset | None = None
        self.val_set: UrbanSoundDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """Class names in classID order, from the metadata when present."""
        path = self.root / METADATA_FILE
        if not path.is_file():
            return list(CLASS_NAMES)
        pairs = read_metadata(self.root)[["classID", "class"]].drop_duplicates()
        names = dict(zip(pairs["classID"], pairs["class"], strict=True))
        return [names.get(i, CLASS_NAMES[i]) for i in range(len(CLASS_NAMES))]

    def prepare_data(self) -> None:
        if (self.root / METADATA_FILE).is_file():
            return
        from examples.urban_sounds.generate import generate

        generate(
            self.root,
            num_clips=self.generate_clips,
            seed=self.seed,
            clip_seconds=self.clip_seconds,
            sample_rate=self.sample_rate,
        )

    def setup(self, stage: str | None = None) -> None:
        folds = sorted(read_metadata(self.root)["fold"].unique().tolist())
        unknown = sorted(set(self.val_folds) - set(folds))
        if unknown:
            raise ValueError(f"`val_folds` {unknown} are not folds of {self.root} ({folds})")
        train_folds = [f for f in folds if f not in self.val_folds]
        kwargs = {"sample_rate": self.sample_rate, "clip_seconds": self.clip_seconds}
        if self.val_set is None:
            self.val_set = UrbanSoundDataset(self.root, self.val_folds, **kwargs)
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = UrbanSoundDataset(self.root, train_folds, **kwargs)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
