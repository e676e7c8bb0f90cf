"""The urban-sounds example: its UrbanSound8K loader, the demo's scoring, a short CLI run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sf = pytest.importorskip("soundfile")
torchaudio = pytest.importorskip("torchaudio")
pytest.importorskip("jsonargparse")

import torch  # noqa: E402
from examples.urban_sounds.data import UrbanSoundDataModule, UrbanSoundDataset  # noqa: E402
from examples.urban_sounds.demo import evaluate  # noqa: E402
from examples.urban_sounds.demo import main as demo_main  # noqa: E402
from examples.urban_sounds.generate import CLASS_NAMES, METADATA_COLUMNS, generate  # noqa: E402
from torch.utils.data import RandomSampler, SequentialSampler  # noqa: E402

from tests.helpers import offline_run_dir, run_table_files  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "urban_sounds.yaml"
TINY = {"num_clips": 80, "clip_seconds": 1.0, "seed": 5, "noise_rate": 0.2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 80-clip synthetic set of 1 s clips (8 per fold), shared read-only."""
    return generate(tmp_path_factory.mktemp("us8k") / "urban_sounds", **TINY)


def _table(path: Path) -> pd.DataFrame:
    table = json.loads(path.read_text())
    return pd.DataFrame(table["data"], columns=table["columns"])


def _metadata(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "metadata" / "UrbanSound8K.csv")


def test_dataset_items_are_dicts_with_file_name_ids_and_relative_paths(tiny: Path) -> None:
    """Each item holds a fixed-length waveform, the annotated classID, its file name and path."""
    dataset = UrbanSoundDataset(tiny, folds=[2], sample_rate=16000, clip_seconds=1.0)
    meta = _metadata(tiny).set_index("slice_file_name")
    assert len(dataset) == int((meta["fold"] == 2).sum()) == 8
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"waveform", "target", "sample_id", "path"}
        assert item["waveform"].dtype == torch.float32 and item["waveform"].shape == (16000,)
        assert item["waveform"].abs().max() > 0.05
        assert item["target"] == meta.loc[item["sample_id"], "classID"]
        assert item["path"] == f"fold2/{item['sample_id']}"
        assert (tiny / "audio" / item["path"]).is_file()


def test_datamodule_splits_by_fold_and_shuffles_only_training(tiny: Path) -> None:
    """Validation folds and training folds are disjoint, cover the set, and batch as dicts."""
    csv = tiny / "metadata" / "UrbanSound8K.csv"
    before = csv.stat().st_mtime_ns
    data = UrbanSoundDataModule(str(tiny), val_folds=[8, 9, 10], batch_size=8, clip_seconds=1.0)
    data.prepare_data()  # the data exists: nothing is generated
    assert csv.stat().st_mtime_ns == before
    data.setup("fit")
    meta = _metadata(tiny).set_index("slice_file_name")
    train_ids = {data.train_set[i]["sample_id"] for i in range(len(data.train_set))}
    val_ids = {data.val_set[i]["sample_id"] for i in range(len(data.val_set))}
    assert not train_ids & val_ids and train_ids | val_ids == set(meta.index)
    assert set(meta.loc[sorted(val_ids), "fold"]) == {8, 9, 10}
    assert data.class_names == CLASS_NAMES

    train, val = data.train_dataloader(), data.val_dataloader()
    assert isinstance(train.sampler, RandomSampler)
    assert isinstance(val.sampler, SequentialSampler)
    batch = next(iter(val))
    assert batch["waveform"].shape == (8, 16000) and batch["target"].dtype == torch.long
    assert batch["sample_id"] == [val.dataset[i]["sample_id"] for i in range(8)]
    assert all(p.split("/")[0] in {"fold8", "fold9", "fold10"} for p in batch["path"])


def test_prepare_data_generates_the_synthetic_set_only_when_missing(tmp_path: Path) -> None:
    """Without metadata, prepare_data writes the synthetic set with the module's settings."""
    root = tmp_path / "fresh"
    data = UrbanSoundDataModule(
        str(root), generate_clips=20, clip_seconds=0.25, sample_rate=8000, val_folds=[10]
    )
    data.prepare_data()
    meta = _metadata(root)
    assert len(meta) == 20 and (root / "metadata" / "ground_truth.csv").is_file()
    info = sf.info(str(root / "audio" / f"fold{meta['fold'][0]}" / meta["slice_file_name"][0]))
    assert info.samplerate == 8000 and info.frames == 2000


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)


def test_real_layout_stereo_high_rate_files_are_mixed_resampled_padded_and_cropped(
    tmp_path: Path,
) -> None:
    """24-bit stereo WAVs at 44.1/48 kHz come out mono, at 16 kHz, padded or cropped to 2 s."""
    root = tmp_path / "UrbanSound8K"
    (root / "audio" / "fold1").mkdir(parents=True)
    (root / "metadata").mkdir()
    short = np.stack([0.6 * _tone(440, 44100, 1.5), 0.2 * _tone(440, 44100, 1.5)], axis=1)
    long = np.stack([_tone(1000, 48000, 3.0), -_tone(1000, 48000, 3.0)], axis=1)  # cancels
    long[:, 0] += 0.5 * _tone(250, 48000, 3.0)
    sf.write(root / "audio/fold1/100032-3-0-0.wav", short, 44100, subtype="PCM_24")
    sf.write(root / "audio/fold1/100263-2-0-117.wav", long * 0.5, 48000, subtype="PCM_24")
    rows = [
        ["100032-3-0-0.wav", 100032, 0.0, 1.5, 1, 1, 3, "dog_bark"],
        ["100263-2-0-117.wav", 100263, 58.5, 61.5, 1, 1, 2, "children_playing"],
    ]
    pd.DataFrame(rows, columns=METADATA_COLUMNS).to_csv(
        root / "metadata/UrbanSound8K.csv", index=False
    )

    dataset = UrbanSoundDataset(root, sample_rate=16000, clip_seconds=2.0)
    first, second = dataset[0], dataset[1]
    assert (first["sample_id"], first["target"]) == ("100032-3-0-0.wav", 3)
    assert second["path"] == "fold1/100263-2-0-117.wav"
    for item in (first, second):
        assert item["waveform"].shape == (32000,) and item["waveform"].dtype == torch.float32

    # Mono mixdown of 0.6 and 0.2 is 0.4; 1.5 s at 16 kHz, then zeros up to 2 s.
    wave = first["waveform"].numpy()
    assert np.abs(wave[24100:]).max() == 0.0
    middle = wave[2000:22000]
    assert middle.max() == pytest.approx(0.4, abs=0.01)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.fft.rfftfreq(len(middle), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=2)

    # The 1 kHz tone cancels between channels; 0.25 * 250 Hz is left, cropped to 2 s.
    wave = second["waveform"].numpy()
    assert np.abs(wave[-2000:]).max() == pytest.approx(0.125, abs=0.01)
    spectrum = np.abs(np.fft.rfft(wave[1000:31000]))
    assert np.fft.rfftfreq(30000, 1 / 16000)[spectrum.argmax()] == pytest.approx(250, abs=2)


def test_evaluate_counts_corrupted_labels_and_hidden_sirens_as_right() -> None:
    """Precision counts corrupted labels and hidden sirens; recall is over corrupted labels."""
    truth = pd.DataFrame(
        {
            "slice_file_name": ["a", "b", "c", "d", "e", "f"],
            "true_classID": [8, 3, 3, 1, 0, 8],
            "annotated_class": ["car_horn", "dog_bark", "dog_bark", "car_horn", "siren", "siren"],
            "is_corrupted": [True, False, False, False, True, False],
            "contains_siren": [True, True, False, False, False, True],
        }
    )
    samples = pd.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e", "f"],
            "is_mismatch": [True, False, True, True, False, False],
            "predicted_label": [8, 3, 1, 1, 1, 8],
        }
    )
    candidates = pd.DataFrame({"sample_id": ["c", "a", "b"]})  # wrong, corrupted, hidden siren
    numbers = evaluate(samples, candidates, truth, top=2)
    assert numbers["precision_at_top"] == 0.5 and numbers["top"] == 2
    assert numbers["precision_at_candidates"] == pytest.approx(2 / 3)
    assert (numbers["num_corrupted"], numbers["num_corrupted_found"]) == (2, 1)
    assert numbers["recall_corrupted"] == 0.5
    assert (numbers["num_dog_siren"], numbers["num_dog_siren_found"]) == (1, 1)
    assert numbers["accuracy_vs_truth"] == pytest.approx(4 / 6)
    assert "num_watch_flagged" not in numbers
    candidates["is_watch_candidate"] = [True, False, True]  # wrong, -, hidden siren
    numbers = evaluate(samples, candidates, truth, top=2)
    assert (numbers["num_watch_flagged"], numbers["num_watch_right"]) == (2, 1)
    assert numbers["num_watch_hidden_sirens"] == 1
    assert set(evaluate(samples, candidates, None)) == {
        "num_samples",
        "num_candidates",
        "mismatch_rate",
    }


def test_demo_trains_through_the_cli_config_and_logs_audio_to_wandb(
    tiny: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two epochs via LightningCLI and the shipped config write outputs and W&B audio media."""
    monkeypatch.setattr(sys, "argv", ["demo"])  # LightningCLI gets its arguments from `args`
    save_dir = tmp_path / "outputs"
    result = demo_main(
        [
            "--config",
            str(CONFIG),
            "--root",
            str(tiny),
            "--num-clips",
            str(TINY["num_clips"]),
            "--max-epochs",
            "2",
            "--data.clip_seconds",
            "1.0",
            "--data.batch_size",
            "16",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.callbacks.projection",
            "pca",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    printed = capsys.readouterr().out

    # Local outputs, one folder per epoch, under the logger's folder.
    outputs = result["outputs"]
    assert outputs.parent.parent == save_dir / "labelwatch-urban-sounds"
    for epoch in (0, 1):
        for name in ("samples.parquet", "candidates.parquet", "candidates.csv", "summary.json"):
            assert (outputs / f"epoch={epoch}" / name).is_file()
    summary = json.loads((outputs / "epoch=1" / "summary.json").read_text())
    assert summary["num_samples"] == 24 and summary["class_names"] == CLASS_NAMES
    samples = pd.read_parquet(outputs / "epoch=1" / "samples.parquet")
    assert samples["path"].str.match(r"fold(8|9|10)/").all()
    # the run's own config beside its outputs (the save_dir's copy is each rerun's)
    assert "max_epochs: 2" in (outputs.parent / "config.yaml").read_text()

    # W&B offline run: per-sample tables with a media column. wandb 0.31 writes the
    # table twice: files/media/table/*.table.json (media cells as placeholders) and a
    # `run_table` artifact that the dashboard reads, holding the audio-file cells and
    # the audio; offline, its files are staged under the W&B data dir.
    run_dir = offline_run_dir(save_dir)
    assert result["run_dir"] == run_dir
    tables = sorted((run_dir / "files/media/table/labelwatch").glob("samples_*.table.json"))
    assert len(tables) == 2
    for path in tables:
        assert "media" in _table(path).columns and len(_table(path)) == 24
    staged = run_table_files(run_dir, "labelwatch/samples.table.json")
    assert len(staged) == 2  # one per epoch
    candidate_cells = []
    for files in staged:
        frame = _table(files["labelwatch/samples.table.json"])
        assert len(frame) == 24
        cells = frame.loc[frame["is_candidate"], "media"].tolist()
        paths = frame.loc[frame["is_candidate"], "path"]
        for cell, path in zip(cells, paths, strict=True):
            assert isinstance(cell, dict) and cell["_type"] == "audio-file"
            assert cell["path"].endswith(Path(path).name)
            assert files[cell["path"]].stat().st_size > 1000  # the staged WAV
        candidate_cells += cells
    assert candidate_cells, "the tiny run flagged no candidates; the media check needs some"

    # The demo's report: numbers computed from the outputs and the next commands.
    assert result["num_candidates"] == summary["num_candidates"]
    assert 0.0 <= result["precision_at_candidates"] <= 1.0
    assert f"relabel-candidates-{result['run_id']}" in printed
    assert f"wandb sync {run_dir}" in printed
    assert f"labelwatch candidates {outputs} --top 20 -o review.csv" in printed
    assert "precision@10" in printed and "recall of corrupted labels" in printed
    assert "watching sirens: " in printed  # the config watches sirens
    assert "candidates leaning toward siren:" in printed
    assert f"labelwatch candidates {outputs} --leaning siren -o siren.csv" in printed
    assert "watch_siren" in samples.columns and summary["watch_classes"] == ["siren"]


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_the_learning_rate_schedule_takes_a_run_of_a_few_batches(steps: int):
    """OneCycleLR divided by zero for 5 steps (a 200-clip, 1-epoch demo): every short run
    now steps through its schedule."""
    from types import SimpleNamespace

    from examples.urban_sounds.model import UrbanSoundClassifier

    model = UrbanSoundClassifier()
    model.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    config = model.configure_optimizers()
    for _ in range(steps):
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()


def test_a_projection_function_without_annotations_is_taken_from_the_command_line(
    tmp_path: Path,
) -> None:
    """LightningCLI accepts a projection function without type hints (the README's GPU
    example has none) for `--trainer.callbacks.projection`."""
    from examples.urban_sounds.train import main

    from labelwatch import LabelWatch
    from tests.helpers import slow_projection

    args = ["--config", "configs/urban_sounds.yaml", f"--data.root={tmp_path}"]
    args += ["--trainer.callbacks.projection", "tests.helpers.slow_projection"]
    cli = main(args, run=False)
    (watch,) = [c for c in cli.trainer.callbacks if isinstance(c, LabelWatch)]
    assert watch.projection is slow_projection


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data.root", "elsewhere"], "--data.root: the demo sets it; use --root"),
        (["--data.seed=5"], "--data.seed: the demo sets it"),
        (["--trainer.strategy", "ddp_spawn"], "--trainer.strategy ddp_spawn: the demo trains"),
        (["--trainer.devices=2"], "--trainer.devices 2: the demo trains and reports in one"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    ],
)
def test_the_demo_refuses_what_it_cannot_honour_before_making_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list[str], message: str
) -> None:
    """Run from another folder, with arguments it sets itself or a DDP run it cannot report
    on: a clear error before any clip is generated. Its default config is the repository's."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        demo_main(["--root", str(tmp_path / "data"), *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    from examples.urban_sounds.demo import DEFAULT_CONFIG

    assert Path(DEFAULT_CONFIG) == CONFIG


def test_the_demo_generates_clips_of_the_length_and_rate_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--data.clip_seconds and --data.sample_rate reached only the loader: the demo made
    2 s clips at 16 kHz and padded them to the length asked for."""
    import examples.urban_sounds.generate as generate_module

    class Generated(Exception):
        pass

    seen = {}

    def generate(root, **kwargs):
        seen.update(kwargs)
        raise Generated  # no need to train

    monkeypatch.setattr(generate_module, "generate", generate)
    arguments = ["--data.clip_seconds", "4.0", "--data.sample_rate=8000"]
    with pytest.raises(Generated):
        demo_main(["--root", str(tmp_path / "data"), *arguments])
    assert (seen["clip_seconds"], seen["sample_rate"]) == (4.0, 8000)
