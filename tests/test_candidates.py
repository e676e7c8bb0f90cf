"""Reading candidates back, from local outputs and W&B run folders, and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger

from labelwatch import LabelWatch, load_candidates
from labelwatch.candidates import read_candidates, select_candidates, to_csv_safe
from labelwatch.cli import main
from tests.helpers import (
    TinyClassifier,
    finish_wandb,
    loaders,
    offline_run_dir,
    trainer_kwargs,
    wandb_records,
)


@pytest.fixture(scope="module")
def fit(tmp_path_factory: pytest.TempPathFactory, _wandb_offline):
    """A 2-epoch fit with 8 flipped labels, logged to an offline W&B run."""
    root = tmp_path_factory.mktemp("candidates-fit")
    train, val = loaders(num_val=60, flip=8)
    callback = LabelWatch(class_names=["a", "b", "c"], projection="pca")
    logger = WandbLogger(project="p", save_dir=str(root), offline=True)
    Trainer(**trainer_kwargs(root, logger=logger, callbacks=[callback], max_epochs=3)).fit(
        TinyClassifier(lr=0.2), train, val
    )
    finish_wandb()  # the run's log is complete once this returns
    return root, callback.last_output_dir.parent


def test_local_outputs_folder_gives_the_latest_epoch(fit):
    """An outputs folder reads as its newest epoch's ranked candidates."""
    _, out = fit
    frame = load_candidates(out)
    expected = pd.read_parquet(out / "epoch=2" / "candidates.parquet")
    pd.testing.assert_frame_equal(frame, expected)
    assert len(frame) > 0 and (frame["epoch"] == 2).all()


def test_local_outputs_for_a_chosen_epoch_and_from_a_parent_folder(fit):
    """epoch= picks an epoch; a parent folder holding one outputs folder works too."""
    root, out = fit
    assert (load_candidates(out, epoch=0)["epoch"] == 0).all()
    pd.testing.assert_frame_equal(load_candidates(root / "p"), load_candidates(out))
    with pytest.raises(FileNotFoundError, match=r"No candidates for epoch 9 .* found \[0, 1, 2\]"):
        load_candidates(out, epoch=9)


def test_offline_wandb_run_folder_gives_the_same_candidates(fit):
    """The run folder's logged candidates table equals the local parquet."""
    root, out = fit
    from_run = load_candidates(offline_run_dir(root))
    local = load_candidates(out)
    assert from_run["sample_id"].tolist() == local["sample_id"].tolist()
    assert from_run["suggested_name"].tolist() == local["suggested_name"].tolist()
    assert (load_candidates(offline_run_dir(root), epoch=1)["epoch"] == 1).all()
    with pytest.raises(FileNotFoundError, match=r"No candidates for epoch 9 .* found \[0, 1, 2\]"):
        load_candidates(offline_run_dir(root), epoch=9)


def test_run_folder_with_a_suffix_keeps_its_run_id(fit, tmp_path):
    """offline-run-<time>-<id>-1 (a same-second relaunch of a run id) reads as run <id>."""
    import shutil

    root, _ = fit
    run_dir = offline_run_dir(root)
    copy = tmp_path / "wandb" / f"{run_dir.name}-1"
    shutil.copytree(run_dir, copy)
    run_id = run_dir.name.split("-", 3)[3]
    assert read_candidates(copy).wandb_run_id == run_id


def test_missing_sources_are_clear_errors(tmp_path):
    """A path with no outputs, and a string that is neither path nor reference, fail clearly."""
    with pytest.raises(FileNotFoundError, match="No labelwatch outputs under"):
        load_candidates(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a W&B artifact"):
        load_candidates(tmp_path / "nope")


def test_cli_prints_the_top_candidates_and_writes_csv(fit, tmp_path, capsys):
    """`labelwatch candidates SOURCE --top 3 -o out.csv` prints 3 rows and writes them."""
    _, out = fit
    target = tmp_path / "review" / "top.csv"
    assert main(["candidates", str(out), "--top", "3", "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    written = pd.read_csv(target)
    assert written["rank"].tolist() == [1, 2, 3]
    assert "suggested_name" in printed and f"wrote 3 candidates to {target}" in printed
    for sample_id in written["sample_id"]:
        assert str(sample_id) in printed


def test_cli_reports_bad_sources_without_a_traceback(tmp_path, capsys):
    """A folder without outputs exits with status 2 and one error line."""
    assert main(["candidates", str(tmp_path)]) == 2
    assert "labelwatch: error: No labelwatch outputs" in capsys.readouterr().err


def test_select_candidates_ranks_flagged_rows_and_applies_the_budget():
    """Only flagged rows, lowest label_quality first, at most max_candidates."""
    samples = pd.DataFrame(
        {
            "sample_id": [1, 2, 3, 4],
            "is_confident_mismatch": [True, False, True, True],
            "label_quality": [0.3, 0.0, 0.1, 0.2],
        }
    )
    ranked = select_candidates(samples, max_candidates=2)
    assert ranked["sample_id"].tolist() == [3, 4]
    assert ranked["rank"].tolist() == [1, 2]


def test_select_candidates_matches_a_stable_sort_with_ties_and_nan():
    """Ties keep their order and NaN quality comes last, as pandas' stable sort_values."""
    samples = pd.DataFrame(
        {
            "sample_id": list("abcdefgh"),
            "is_candidate": [True, True, False, True, True, True, False, True],
            "label_quality": [0.5, float("nan"), 0.0, 0.2, 0.5, 0.2, 0.1, 0.9],
        }
    )
    expected = samples[samples["is_candidate"]].sort_values("label_quality", kind="stable")
    for budget in (None, 0, 3, 100):
        ranked = select_candidates(samples, budget, flag_column="is_candidate")
        assert ranked["sample_id"].tolist() == expected["sample_id"].tolist()[:budget]
        assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))


def test_csv_cells_that_look_like_formulas_are_neutralised():
    """Text starting with = + - @ gets a leading quote; numbers are untouched."""
    frame = pd.DataFrame({"path": ["=HYPERLINK(1)", "+1", "-x", "@a", "ok.wav"], "n": [-1] * 5})
    safe = to_csv_safe(frame)
    assert safe["path"].tolist() == ["'=HYPERLINK(1)", "'+1", "'-x", "'@a", "ok.wav"]
    assert safe["n"].tolist() == [-1] * 5


def test_csv_neutralising_is_the_same_for_text_and_object_columns():
    """A text column (tested at once) and an object column (cell by cell) are neutralised
    alike, missing values and non-text objects kept as they are."""
    cells = ["\tx", "\rx", "'q", None, "fine", "=1"]
    text = pd.Series(cells, dtype="string")
    mixed = pd.Series([*cells, 7], dtype=object)
    expected = ["'\tx", "'\rx", "''q", None, "fine", "'=1"]
    safe_text = to_csv_safe(pd.DataFrame({"c": text}))["c"]
    assert [None if pd.isna(v) else v for v in safe_text] == expected
    assert to_csv_safe(pd.DataFrame({"c": mixed}))["c"].tolist() == [*expected, 7]


@pytest.mark.parametrize("rows", [0, 5, 7])
def test_parquet_written_a_row_group_at_a_time_reads_back_like_to_parquet(tmp_path, rows):
    """Same frame, dtypes and attrs as pandas' to_parquet, also when a text column is all
    None in the first row group and the last group is short."""
    from labelwatch.sinks.local import write_parquet

    frame = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(rows)],
            "given_label": list(range(rows)),
            "label_quality": [i / 10 for i in range(rows)],
            "is_candidate": [i % 2 == 0 for i in range(rows)],
            "path": [None] * min(rows, 3) + [f"clip{i}.wav" for i in range(3, rows)],
        }
    )
    frame.attrs["class_names"] = ["a", "b"]
    frame.to_parquet(tmp_path / "pandas.parquet", index=False)
    write_parquet(frame, str(tmp_path / "groups.parquet"), rows_per_group=3)
    expected = pd.read_parquet(tmp_path / "pandas.parquet")
    written = pd.read_parquet(tmp_path / "groups.parquet")
    pd.testing.assert_frame_equal(written, expected)
    assert written.attrs == expected.attrs == {"class_names": ["a", "b"]}


def test_wandb_run_folder_of_several_dataloaders_names_them_or_reads_the_chosen_one(
    tmp_path, _wandb_offline
):
    """Two watched loaders: the run folder is ambiguous and the error lists both keys. One
    watched named loader (`dataloaders=["clean set"]`): its run folder reads with the class
    names and artifact of that loader's local outputs, and the artifact, whose name W&B
    would refuse with the space, is logged with `_` for it."""
    from torch.utils.data import DataLoader

    from tests.helpers import BlobDataset

    train, val = loaders(num_val=30, flip=6)
    clean = DataLoader(BlobDataset(20, seed=3, flip=5), batch_size=10)  # so it has candidates
    for watched in (None, ["clean set"]):
        torch.manual_seed(0)
        root = tmp_path / str(watched)
        callback = LabelWatch(class_names=["a", "b", "c"], projection="none", dataloaders=watched)
        logger = WandbLogger(project="p", save_dir=str(root), offline=True)
        Trainer(**trainer_kwargs(root, logger=logger, callbacks=[callback], max_epochs=1)).fit(
            TinyClassifier(), train, {"noisy": val, "clean set": clean}
        )
        finish_wandb()
        run_id = logger.experiment.id
        if watched is None:
            with pytest.raises(FileNotFoundError, match="several validation dataloaders") as err:
                read_candidates(offline_run_dir(root))
            assert "labelwatch/clean set/candidates" in str(err.value)
            assert "labelwatch/noisy/candidates" in str(err.value)
        else:
            found = read_candidates(offline_run_dir(root))
            assert len(found.frame) > 0
            assert found.class_names == ["a", "b", "c"] and found.epoch == 0
            assert found.artifact == f"p/relabel-candidates-clean_set-{run_id}:epoch-0"
            local = read_candidates(root / "p" / run_id / "labelwatch" / "clean set")
            assert found.artifact == local.artifact
            (log_file,) = offline_run_dir(root).glob("*.wandb")
            logged = [r.artifact.name for r in wandb_records(log_file) if r.HasField("artifact")]
            assert f"relabel-candidates-clean_set-{run_id}" in logged


def test_wandb_run_folder_reads_an_epoch_without_candidates(tmp_path, _wandb_offline):
    """An epoch with no candidates logs an empty table: read back from the run folder it
    is still that epoch's (found from the samples table at the same step), with its
    summary's class names and artifact, and epoch= finds it."""
    train, val = loaders(num_val=30, flip=4)
    callback = LabelWatch(class_names=["a", "b", "c"], projection="none", max_candidates=0)
    logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=2)).fit(
        TinyClassifier(), train, val
    )
    finish_wandb()
    run_dir = offline_run_dir(tmp_path)
    latest = read_candidates(run_dir)
    assert latest.frame.empty
    assert latest.epoch == 1
    assert latest.class_names == ["a", "b", "c"]
    assert latest.artifact == f"p/relabel-candidates-{latest.wandb_run_id}:epoch-1"
    first = read_candidates(run_dir, epoch=0)
    assert first.frame.empty and first.epoch == 0
