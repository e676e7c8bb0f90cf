"""Tests for the synthetic UrbanSound8K-like generator of the urban-sounds example."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sf = pytest.importorskip("soundfile")

from examples.urban_sounds.generate import (  # noqa: E402
    CLASS_NAMES,
    CONFUSABLE,
    GROUND_TRUTH_COLUMNS,
    METADATA_COLUMNS,
    SIREN,
    generate,
    main,
)

SMALL = {"num_clips": 100, "clip_seconds": 1.0, "seed": 3}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100-clip data set shared by the read-only tests of this module."""
    return generate(tmp_path_factory.mktemp("small") / "us8k", **SMALL)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-clip data set of short clips with the default rates."""
    return generate(tmp_path_factory.mktemp("large"), num_clips=400, clip_seconds=0.25, seed=1)


def read(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    meta = pd.read_csv(root / "metadata" / "UrbanSound8K.csv")
    truth = pd.read_csv(root / "metadata" / "ground_truth.csv")
    return meta, truth


def all_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_class_names_follow_urbansound8k_ids() -> None:
    """CLASS_NAMES lists the ten UrbanSound8K classes in classID order."""
    assert CLASS_NAMES[0] == "air_conditioner"
    assert CLASS_NAMES[3] == "dog_bark"
    assert CLASS_NAMES[SIREN] == "siren" and SIREN == 8
    assert CLASS_NAMES[9] == "street_music"
    assert len(set(CLASS_NAMES)) == 10


def test_layout_matches_urbansound8k(small: Path) -> None:
    """Folders, CSV columns and file names follow UrbanSound8K, and every listed WAV exists."""
    assert sorted(p.name for p in (small / "audio").iterdir()) == sorted(
        f"fold{k}" for k in range(1, 11)
    )
    meta, truth = read(small)
    assert list(meta.columns) == METADATA_COLUMNS
    assert list(truth.columns) == GROUND_TRUTH_COLUMNS
    assert len(meta) == len(truth) == SMALL["num_clips"]
    assert meta["slice_file_name"].is_unique
    assert list(truth["slice_file_name"]) == list(meta["slice_file_name"])

    listed = {
        f"fold{f}/{name}" for f, name in zip(meta["fold"], meta["slice_file_name"], strict=True)
    }
    on_disk = {str(p.relative_to(small / "audio")) for p in (small / "audio").rglob("*.wav")}
    assert on_disk == listed

    for row in meta.to_dict("records"):
        fs_id, class_id, occurrence, _ = re.fullmatch(
            r"(\d+)-(\d)-(\d+)-(\d+)\.wav", row["slice_file_name"]
        ).groups()
        assert (int(fs_id), int(class_id), occurrence) == (row["fsID"], row["classID"], "0")
        assert row["class"] == CLASS_NAMES[row["classID"]]
        assert 0 <= row["start"] < row["end"] <= row["start"] + SMALL["clip_seconds"] + 1e-6
        assert row["salience"] in (1, 2)


def test_audio_is_16k_mono_pcm16_and_peak_normalised(small: Path) -> None:
    """Every clip is 16 kHz mono PCM_16 of clip_seconds, not silent and not clipped."""
    meta, _ = read(small)
    for fold, name in zip(meta["fold"], meta["slice_file_name"], strict=True):
        path = small / "audio" / f"fold{fold}" / name
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == 16000 * SMALL["clip_seconds"]
        audio, _ = sf.read(path)
        assert np.isfinite(audio).all()
        assert 0.25 <= np.max(np.abs(audio)) <= 0.96


def test_same_seed_gives_identical_bytes(small: Path, tmp_path: Path) -> None:
    """The same arguments write byte-identical CSVs and WAVs."""
    again = generate(tmp_path / "again", **SMALL)
    assert all_bytes(again) == all_bytes(small)


def test_worker_processes_do_not_change_output(tmp_path: Path) -> None:
    """Rendering in two spawned worker processes gives the same bytes as in one process."""
    args = {"num_clips": 20, "clip_seconds": 0.25, "seed": 5}
    serial = generate(tmp_path / "serial", **args)
    parallel = generate(tmp_path / "parallel", workers=2, **args)
    assert all_bytes(parallel) == all_bytes(serial)


def test_different_seed_differs(small: Path, tmp_path: Path) -> None:
    """Another seed gives other labels, names and audio."""
    other = generate(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    meta, _ = read(small)
    other_meta, _ = read(other)
    assert set(meta["slice_file_name"]) != set(other_meta["slice_file_name"])
    first = small / "audio" / f"fold{meta['fold'][0]}" / meta["slice_file_name"][0]
    assert first.read_bytes() not in {p.read_bytes() for p in other.rglob("*.wav")}


def test_ground_truth_is_consistent(small: Path) -> None:
    """Annotated labels match the metadata and differ from the truth exactly where corrupted."""
    meta, truth = read(small)
    assert (truth["annotated_classID"] == meta["classID"]).all()
    assert (truth["annotated_class"] == meta["class"]).all()
    assert (truth["true_class"] == [CLASS_NAMES[c] for c in truth["true_classID"]]).all()
    changed = truth["annotated_classID"] != truth["true_classID"]
    assert (truth["is_corrupted"] == changed).all()
    assert truth["is_corrupted"].sum() == round(0.08 * SMALL["num_clips"])

    background = truth["background_classID"]
    assert background.between(-1, 9).all()
    assert (background != truth["true_classID"]).all()
    sirens = (truth["true_classID"] == SIREN) | (background == SIREN)
    assert (truth["contains_siren"] == sirens).all()


@pytest.mark.parametrize("noise_rate", [0.0, 0.2])
def test_corruption_rate_follows_noise_rate(tmp_path: Path, noise_rate: float) -> None:
    """The share of corrupted labels is noise_rate, rounded to whole clips."""
    root = generate(tmp_path, num_clips=50, clip_seconds=0.25, noise_rate=noise_rate)
    _, truth = read(root)
    assert truth["is_corrupted"].sum() == round(noise_rate * 50)


def test_corruption_mostly_flips_to_a_confusable_class(large: Path) -> None:
    """Most corrupted labels name the class that sounds like the true one."""
    _, truth = read(large)
    corrupted = truth[truth["is_corrupted"]]
    assert len(corrupted) == 32
    partner = corrupted["true_classID"].map(CONFUSABLE)
    assert (corrupted["annotated_classID"] == partner).mean() >= 0.5


def test_sirens_in_foreground_and_background(large: Path) -> None:
    """Sirens appear as labelled clips and behind other classes, notably behind dog barks."""
    _, truth = read(large)
    assert truth.loc[truth["true_class"] == "siren", "contains_siren"].all()
    dogs = truth[truth["true_class"] == "dog_bark"]
    mixed = dogs[dogs["background_classID"] >= 0]
    assert len(mixed) == round(0.15 * len(dogs))
    assert (mixed["background_classID"] == SIREN).sum() >= len(mixed) / 3
    assert mixed["contains_siren"].sum() >= 1
    # These clips keep the foreground label only: the case the callback must surface.
    assert (mixed.loc[mixed["contains_siren"], "true_class"] == "dog_bark").all()


def test_classes_and_folds_are_balanced(tmp_path: Path) -> None:
    """Classes differ by at most one clip, and so do folds and each class within folds."""
    root = generate(tmp_path, num_clips=105, clip_seconds=0.25, folds=5)
    meta, truth = read(root)
    per_class = truth["true_classID"].value_counts()
    assert len(per_class) == 10 and per_class.max() - per_class.min() <= 1
    per_fold = meta["fold"].value_counts()
    assert sorted(per_fold.index) == [1, 2, 3, 4, 5]
    assert per_fold.max() - per_fold.min() <= 1
    grid = pd.crosstab(truth["true_classID"], meta["fold"])
    assert (grid.max(axis=1) - grid.min(axis=1) <= 1).all()


def test_slices_of_one_recording_share_a_fold_and_do_not_overlap(small: Path) -> None:
    """Slices with the same fsID stay in one fold and follow each other in time."""
    meta, _ = read(small)
    for _, rec in meta.groupby("fsID"):
        assert rec["fold"].nunique() == 1
        rec = rec.sort_values("start")
        assert (rec["start"].to_numpy()[1:] >= rec["end"].to_numpy()[:-1]).all()


def test_regenerating_replaces_the_previous_data_set(tmp_path: Path) -> None:
    """Generating again into the same folder leaves only the new clips."""
    generate(tmp_path, num_clips=30, clip_seconds=0.25)
    generate(tmp_path, num_clips=10, clip_seconds=0.25, folds=2, seed=9)
    meta, _ = read(tmp_path)
    assert len(meta) == 10
    assert len(list((tmp_path / "audio").rglob("*.wav"))) == 10
    assert not (tmp_path / "audio" / "fold3").exists()


def test_refuses_a_folder_with_foreign_audio(tmp_path: Path) -> None:
    """A root whose audio folder holds files written by someone else is left untouched."""
    (tmp_path / "audio" / "fold1").mkdir(parents=True)
    (tmp_path / "audio" / "fold1" / "real.wav").write_bytes(b"RIFF")
    with pytest.raises(FileExistsError, match="did not write"):
        generate(tmp_path, num_clips=10, clip_seconds=0.25)
    assert (tmp_path / "audio" / "fold1" / "real.wav").read_bytes() == b"RIFF"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clips": 9}, r"`num_clips` must be an integer >= 10 .*got 9"),
        ({"num_clips": 12.0}, r"`num_clips` must be an integer .*got 12\.0"),
        ({"noise_rate": 1.0}, r"`noise_rate` must be a number in \[0, 1\), got 1\.0"),
        ({"noise_rate": -0.1}, r"`noise_rate` must be a number in \[0, 1\), got -0\.1"),
        ({"mixture_rate": 1.5}, r"`mixture_rate` must be a number in \[0, 1\], got 1\.5"),
        ({"clip_seconds": 0.1}, r"`clip_seconds` must be a number in \[0\.25, 30\], got 0\.1"),
        ({"sample_rate": 100}, r"`sample_rate` must be an integer in \[8000, 48000\], got 100"),
        ({"folds": 0}, r"`folds` must be an integer in \[1, num_clips=20\], got 0"),
        ({"folds": 21}, r"`folds` must be an integer in \[1, num_clips=20\], got 21"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"seed": True}, r"`seed` must be an integer >= 0, got True"),
        ({"workers": 0}, r"`workers` must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    """Out-of-range arguments raise ValueError naming the argument, the range and the value."""
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **{"num_clips": 20, **kwargs})
    assert not (tmp_path / "audio").exists()


def test_command_line_writes_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line generates a data set and reports what it wrote."""
    main([str(tmp_path), "--num-clips", "10", "--seed", "2", "--noise-rate", "0.1",
          "--clip-seconds", "0.25", "--workers", "1"])  # fmt: skip
    assert "wrote 10 clips" in capsys.readouterr().out
    meta, truth = read(tmp_path)
    assert len(meta) == 10 and truth["is_corrupted"].sum() == 1


def test_command_line_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A bad option exits with status 2 and the validation message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--noise-rate", "1.5"])
    assert exit_info.value.code == 2
    assert "`noise_rate` must be a number in [0, 1), got 1.5" in capsys.readouterr().err
