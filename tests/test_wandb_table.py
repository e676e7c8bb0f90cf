"""The W&B tables LabelWatch builds: the same column types and rows as wandb.Table's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb

from labelwatch.sinks.wandb import _table


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": [3, 1, 2, 0],
            "given_label": ["dog_bark", "siren", "siren", "dog_bark"],
            "entropy": [0.1, np.nan, 0.3, 0.4],  # a missing float in the middle
            "is_candidate": [False, True, False, True],
            "x": [np.nan, np.nan, 0.5, -1.0],  # missing first, then present
            "path": ["a.wav", None, "c.wav", "d.wav"],
            "count": pd.array([1, None, 3, 4], dtype="Int64"),  # pandas' nullable dtypes
            "name": pd.array(["a", "b", None, "d"], dtype="string"),
            "score": [np.float32(0.5), None, 1.0, np.float64(2.0)],  # numpy values in objects
        }
    )


def test_types_and_rows_equal_those_of_wandb_table():
    """Types learnt from a few example rows equal those wandb infers row by row."""
    frame = _frame()
    audio = wandb.Audio(np.zeros(1600, dtype=np.float32), sample_rate=16000)
    media = {1: audio, 0: audio}  # rows 0 and 2 have none
    fast = _table(frame, media)
    rows = [list(row) for row in fast.data]
    reference = wandb.Table(columns=fast.columns, data=rows)
    assert fast.columns == [*frame.columns, "media"]
    assert repr(fast._column_types) == repr(reference._column_types)
    assert "Audio" in repr(fast._column_types) and "Number" in repr(fast._column_types)
    assert fast.data == reference.data and len(fast.data) == len(frame)
    assert fast.data[1][2] is None and fast.data[1][-1] is audio and fast.data[0][-1] is None
    assert [row[6:9] for row in fast.data] == [
        [1, "a", 0.5],
        [None, "b", None],
        [3, None, 1.0],
        [4, "d", 2.0],
    ]
    assert {type(row[8]) for row in fast.data} == {float, type(None)}


def test_a_column_of_mixed_types_is_refused_as_wandb_refuses_it():
    frame = _frame().assign(path=["a.wav", 7, "c.wav", "d.wav"])
    with pytest.raises(TypeError, match="incompatible types"):
        _table(frame, None)


def test_plain_cells_skip_wandbs_conversion_and_serialise_the_same(tmp_path):
    """Inside `_plain_cells_as_they_are` a table goes into an artifact exactly as W&B itself
    writes it (media, NaN and numpy values still take W&B's path), and W&B's converter is
    back in place afterwards, also after an error."""
    from wandb.sdk.data_types import table as table_module

    from labelwatch.sinks.wandb import _plain_cells_as_they_are

    audio = wandb.Audio(np.zeros(1600, dtype=np.float32), sample_rate=16000)
    columns = ["id", "flag", "score", "name", "media", "other"]
    rows = [
        [1, True, 0.5, "dog_bark", audio, None],
        [2**70, False, float("nan"), "x" * 20_000, None, np.float32(1.5)],
        [-3, None, float("inf"), "", audio, np.int64(4)],
    ]

    def serialised() -> dict:
        data = [list(row) for row in rows]
        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        return table.to_json(wandb.Artifact("t", type="run_table"))

    convert = table_module._json_helper
    expected = serialised()
    with _plain_cells_as_they_are():
        assert table_module._json_helper is not convert
        fast = serialised()
    assert table_module._json_helper is convert

    # Media are written to temporary files under new names each time: compare the rest.
    def strip(data: list) -> list:
        return [[c.get("_type") if isinstance(c, dict) else c for c in row] for row in data]

    assert strip(fast["data"]) == strip(expected["data"])
    assert fast["data"][1][2] is None and fast["data"][2][2] == float("inf")
    assert fast["data"][0][4]["_type"] == "audio-file"
    assert fast["column_types"] == expected["column_types"]
    with pytest.raises(RuntimeError), _plain_cells_as_they_are():
        raise RuntimeError("logging failed")
    assert table_module._json_helper is convert


def test_plain_rows_are_written_as_wandb_writes_them(tmp_path):
    """Inside `_plain_cells_as_they_are`, the run's copy of a table keeps plain rows as W&B's
    `_numpy_arrays_to_lists` would return them (numpy values and media still go through it),
    and the artifact's copy is written to the same text; both are back afterwards."""
    from wandb.sdk.artifacts import artifact as artifact_module
    from wandb.sdk.data_types import table as table_module

    from labelwatch.sinks.wandb import _plain_cells_as_they_are

    audio = wandb.Audio(np.zeros(1600, dtype=np.float32), sample_rate=16000)
    payload = {
        "columns": ["id", "flag", "score", "name", "other"],
        "data": [
            [1, True, 0.5, "dog_bark", None],
            [2, False, float("nan"), "x" * 20_000, np.float32(1.5)],
            [3, None, float("inf"), "", np.arange(3)],
            [4, True, 0.25, "siren", audio],
        ],
    }
    to_lists, artifact_json = table_module._numpy_arrays_to_lists, artifact_module.json
    expected = to_lists(payload)

    def written() -> str:
        rows = [[1, True, 0.5, "dog_bark"], [2**70, None, float("nan"), "x" * 20_000]]
        table = wandb.Table(columns=["id", "flag", "score", "name"], data=rows)
        artifact = wandb.Artifact("t", type="run_table")
        artifact.add(table, "t")
        return Path(artifact.manifest.entries["t.table.json"].local_path).read_text()

    expected_text = written()
    with _plain_cells_as_they_are():
        assert table_module._numpy_arrays_to_lists is not to_lists
        assert artifact_module.json is not artifact_json
        fast = table_module._numpy_arrays_to_lists(payload)
        fast_text = written()
    assert table_module._numpy_arrays_to_lists is to_lists
    assert artifact_module.json is artifact_json
    assert fast_text == expected_text and '"NaN"' not in fast_text
    assert fast["columns"] == expected["columns"]
    assert fast["data"][0] is payload["data"][0]  # plain: kept as it was
    assert fast["data"][1][:4] == payload["data"][1][:4] and np.isnan(fast["data"][1][2])
    assert fast["data"][1][4] == expected["data"][1][4] == 1.5
    assert fast["data"][2][4] == expected["data"][2][4] == [0, 1, 2]
    assert fast["data"][3][4] == expected["data"][3][4] == "Audio"


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_a_run_started_here_keeps_its_media_in_save_dir(tmp_path, mode):
    """Only a run whose media go outside save_dir is reported (ddp_spawn's re-attached run,
    in tests/test_distributed.py); a disabled run writes nothing."""
    from lightning.pytorch.loggers import WandbLogger

    from labelwatch.sinks.wandb import WandbSink

    logger = WandbLogger(project="labelwatch-tests", save_dir=str(tmp_path), mode=mode)
    sink = WandbSink(logger)
    assert sink.stray_media_dir() is None
    if mode == "offline":  # the check looked at a real folder
        assert sink.run.dir.startswith(str(tmp_path))


def test_a_media_column_of_audio_and_images_is_logged(tmp_path: Path):
    """A media_fn giving audio for some rows and images for others: W&B refused the whole
    table (both tables, the metrics and the artifact of every epoch were lost)."""
    import json

    frame = pd.DataFrame({"sample_id": [0, 1, 2], "x": [1.0, 2.0, 3.0]})
    media = {
        0: wandb.Audio(np.zeros(800, dtype=np.float32), sample_rate=8000),
        1: wandb.Image(np.zeros((4, 4, 3), dtype=np.uint8)),
        2: None,
    }
    run = wandb.init(mode="offline", dir=str(tmp_path), project="mixed")
    try:
        run.log({"samples": _table(frame, media)})
    finally:
        run.finish()
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 3
