"""From candidates to corrected labels: pull, review (Label Studio or CSV), apply, retrain."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, Dataset

from labelwatch import LabelWatch
from labelwatch.candidates import from_csv_safe, to_csv_safe
from labelwatch.cli import main
from labelwatch.relabel import RelabelError, apply_decisions, read_decisions, read_labels
from tests.helpers import BlobDataset, TinyClassifier, finish_wandb, loaders, trainer_kwargs
from tests.test_labelstudio import export_task

NAMES = ["a", "b", "c"]
NUM_VAL, FLIPPED = 60, 8


def truth(sample_id: int | str) -> str:
    """The class BlobDataset drew the sample from (its first FLIPPED labels are wrong)."""
    return NAMES[(int(sample_id) - 1000) % len(NAMES)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, _wandb_offline):
    """A 3-epoch fit with flipped labels and paths, logged to an offline W&B run, and labels.csv."""
    root = tmp_path_factory.mktemp("relabel-fit")
    train, val = loaders(num_val=NUM_VAL, flip=FLIPPED)
    callback = LabelWatch(class_names=NAMES, metadata_keys=["path"], projection="pca")
    logger = WandbLogger(project="p", save_dir=str(root), offline=True)
    Trainer(**trainer_kwargs(root, logger=logger, callbacks=[callback], max_epochs=3)).fit(
        TinyClassifier(lr=0.2), train, val
    )
    run_id = logger.experiment.id
    finish_wandb()  # the run's log is complete once this returns
    dataset = val.dataset
    labels = pd.DataFrame(
        {
            "sample_id": [dataset[i]["sample_id"] for i in range(len(dataset))],
            "label": [NAMES[int(label)] for label in dataset.labels],
            "path": [dataset[i]["path"] for i in range(len(dataset))],
        }
    )
    labels.to_csv(root / "labels.csv", index=False)
    return {"root": root, "out": callback.last_output_dir.parent, "run_id": run_id}


class RelabelledBlobs(Dataset):
    """BlobDataset's samples with the labels of a (corrected) labels CSV, by sample id."""

    def __init__(self, base: BlobDataset, labels_csv: Path):
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        by_id = dict(zip(table["sample_id"], table["label"], strict=True))
        self.base = base
        self.targets = [NAMES.index(by_id[str(base[i]["sample_id"])]) for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "target": torch.tensor(self.targets[index])}


def test_candidates_cli_writes_csv_parquet_and_json(run, tmp_path, capsys):
    """--format (or the -o suffix) picks csv, parquet or json; --epoch and --top apply."""
    out = run["out"]
    assert main(["candidates", str(out), "--top", "3", "-o", str(tmp_path / "c.csv")]) == 0
    assert main(["candidates", str(out), "--epoch", "1", "-o", str(tmp_path / "c.parquet")]) == 0
    assert main(["candidates", str(out), "--format", "json", "-o", str(tmp_path / "c.txt")]) == 0
    capsys.readouterr()
    local = pd.read_parquet(out / "epoch=2" / "candidates.parquet")
    as_csv = pd.read_csv(tmp_path / "c.csv", keep_default_na=False)
    assert as_csv["sample_id"].tolist() == local["sample_id"].head(3).tolist()
    assert (as_csv["run"] == run["run_id"]).all() and (as_csv["decision"] == "").all()
    as_parquet = pd.read_parquet(tmp_path / "c.parquet")
    epoch1 = pd.read_parquet(out / "epoch=1" / "candidates.parquet")
    pd.testing.assert_frame_equal(as_parquet.drop(columns="run"), epoch1)
    records = json.loads((tmp_path / "c.txt").read_text())
    assert [r["sample_id"] for r in records] == local["sample_id"].tolist()
    assert records[0]["path"].startswith("audio/") and records[0]["run"] == run["run_id"]


def test_candidates_cli_writes_to_standard_output_and_keeps_its_table_narrow(run, tmp_path, capsys):
    """-o - sends the CSV or JSON itself to standard output (parquet is refused); the
    printed table cuts long cells (a path) to 40 characters. An epoch=<n> folder with
    another --epoch is an error, not that folder's epoch."""
    out = run["out"]
    assert main(["candidates", str(out), "--top", "2", "-o", "-"]) == 0
    printed = capsys.readouterr()
    as_csv = pd.read_csv(io.StringIO(printed.out), keep_default_na=False)
    local = pd.read_parquet(out / "epoch=2" / "candidates.parquet")
    assert as_csv["sample_id"].tolist() == local["sample_id"].head(2).tolist()
    assert "wrote 2 candidates to standard output" in printed.err
    assert main(["candidates", str(out), "--top", "2", "-o", "-", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["candidates", str(out), "-o", "-", "--format", "parquet"]) == 2
    assert "parquet cannot go to standard output" in capsys.readouterr().err
    assert not (Path.cwd() / "-").exists()
    long = tmp_path / "long"
    shutil.copytree(out / "epoch=2", long / "epoch=2")
    frame = pd.read_parquet(long / "epoch=2/candidates.parquet")
    frame["given_name"] = "x" * 200
    frame.to_parquet(long / "epoch=2/candidates.parquet")
    assert main(["candidates", str(long), "--top", "3"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) < 200
    assert main(["candidates", str(out / "epoch=1"), "--epoch", "2"]) == 2
    assert "holds epoch 1, not epoch 2" in capsys.readouterr().err


def test_candidates_cli_refuses_to_write_over_its_input(run, capsys):
    """-o inside the outputs folder it reads (the epoch read or another, also when the
    source is one epoch folder among them) is refused, and the files are left as they were."""
    for source in (run["out"], run["out"] / "epoch=2"):
        for epoch in (2, 1):
            target = run["out"] / f"epoch={epoch}" / "candidates.csv"
            before = target.read_bytes()
            assert main(["candidates", str(source), "-o", str(target)]) == 2
            assert "refusing to write" in capsys.readouterr().err
            assert target.read_bytes() == before


def test_round_trip_through_label_studio_and_a_second_training_run(run, tmp_path, capsys):
    """Tasks -> a Label Studio export -> apply -> corrected labels the next run trains on."""
    root, out = run["root"], run["out"]
    tasks_path, config_path = tmp_path / "tasks.json", tmp_path / "config.xml"
    argv = ["export-label-studio", str(out), "--data-template", "https://host/media/{path}"]
    assert main([*argv, "-o", str(tasks_path), "--config-out", str(config_path)]) == 0
    tasks = json.loads(tasks_path.read_text())
    candidates = pd.read_parquet(out / "epoch=2" / "candidates.parquet")
    assert [t["data"]["sample_id"] for t in tasks] == candidates["sample_id"].tolist()
    assert tasks[0]["data"]["audio"] == f"https://host/media/{candidates['path'].iloc[0]}"
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [
        candidates["suggested_name"].iloc[0]
    ]
    assert '<Audio name="audio" value="$audio"/>' in config_path.read_text()

    # The reviewer answers every task but the last with the true class; a cancelled
    # annotation with a wrong class is ignored.
    exported = [
        export_task(task, n, [([truth(task["data"]["sample_id"])], False)])
        for n, task in enumerate(tasks[:-1], start=1)
    ]
    exported[0]["annotations"].append(export_task(tasks[0], 1, [(["a"], True)])["annotations"][0])
    export_path = tmp_path / "project-1-export.json"
    export_path.write_text(json.dumps(exported))

    corrected_path = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(root / "labels.csv"), "--decisions", str(export_path)]
    assert main([*argv, "-o", str(corrected_path), "--candidates", str(out)]) == 0
    assert "labels changed" in capsys.readouterr().out
    corrected = pd.read_csv(corrected_path, dtype=str)
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    audit = pd.read_csv(tmp_path / "corrected.audit.csv", dtype=str)
    reviewed = [str(t["data"]["sample_id"]) for t in tasks[:-1]]
    assert audit["sample_id"].tolist() == reviewed
    assert audit["new_label"].tolist() == [truth(i) for i in reviewed]
    assert (audit["decision_source"] == "label-studio:project-1-export.json").all()
    assert (audit["epoch"] == "2").all() and (audit["run"] == run["run_id"]).all()
    expected = labels.copy()
    fixed = expected["sample_id"].isin(reviewed)
    expected.loc[fixed, "label"] = expected.loc[fixed, "sample_id"].map(truth)
    pd.testing.assert_frame_equal(corrected, expected)
    assert (corrected["label"] != labels["label"]).sum() == (audit["changed"] == "True").sum() > 0

    # The next run reads corrected.csv: LabelWatch sees the corrected labels as given.
    data = RelabelledBlobs(BlobDataset(NUM_VAL, seed=2, flip=FLIPPED), corrected_path)
    callback = LabelWatch(class_names=NAMES, metadata_keys=["path"], projection="pca")
    second = tmp_path / "second"
    Trainer(**trainer_kwargs(second, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(lr=0.2),
        DataLoader(data, batch_size=16, shuffle=True),
        DataLoader(data, batch_size=16),
    )
    samples = pd.read_parquet(callback.last_output_dir / "samples.parquet")
    seen = dict(zip(samples["sample_id"].astype(str), samples["given_name"], strict=True))
    assert seen == dict(zip(corrected["sample_id"], corrected["label"], strict=True))
    assert all(seen[i] == truth(i) for i in reviewed)


def test_round_trip_through_a_reviewed_spreadsheet(run, tmp_path, capsys):
    """accept takes the suggestion, reject keeps, a class name relabels, blank is no decision."""
    root = run["root"]
    review = tmp_path / "review.csv"
    assert main(["candidates", str(run["out"]), "--top", "4", "-o", str(review)]) == 0
    table = pd.read_csv(review, dtype=str, keep_default_na=False)
    table["decision"] = ["accept", "Reject", "a", ""]
    table.to_csv(review, index=False)
    corrected_path, audit_path = tmp_path / "out" / "corrected.csv", tmp_path / "audit.csv"
    argv = ["apply", "--labels", str(root / "labels.csv"), "--decisions", str(review)]
    assert main([*argv, "-o", str(corrected_path), "--audit", str(audit_path)]) == 0
    assert "applied 3 decisions: " in capsys.readouterr().out
    audit = pd.read_csv(audit_path, dtype=str)
    ids = table["sample_id"].tolist()
    assert audit["sample_id"].tolist() == ids[:3]
    assert audit["old_label"].tolist() == table["given_name"].head(3).tolist()
    assert audit["new_label"].tolist() == [table["suggested_name"][0], table["given_name"][1], "a"]
    assert audit["decision"].tolist() == ["accept", "Reject", "a"]
    assert (audit["decision_source"] == "csv:review.csv").all()
    assert (audit["run"] == run["run_id"]).all() and (audit["epoch"] == "2").all()
    corrected = read_labels(corrected_path).set_index("sample_id")["label"]
    assert corrected[ids[0]] == table["suggested_name"][0] and corrected[ids[2]] == "a"
    assert corrected[ids[3]] == table["given_name"][3]  # blank: untouched


def test_apply_refuses_unknown_ids_unknown_classes_and_conflicts(run, tmp_path, capsys):
    """One exit-2 message lists every unknown id, unknown class and conflict; nothing written."""
    decisions = tmp_path / "decisions.csv"
    pd.DataFrame(
        {
            "sample_id": ["999999", "1004", "1001", "1001", "1002"],
            "decision": ["a", "sirne", "a", "b", "c"],
        }
    ).to_csv(decisions, index=False)
    output = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(decisions)]
    assert main([*argv, "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert "unknown sample ids (not in the labels): 999999 (csv:decisions.csv, line 2)" in err
    assert "unknown class names (valid: ['a', 'b', 'c']" in err and "'sirne' for 1004" in err
    assert "conflicting decisions: 1001: a (a; csv:decisions.csv, line 4)" in err
    assert not output.exists() and not (tmp_path / "corrected.audit.csv").exists()


def test_disagreeing_label_studio_annotations_are_refused_as_conflicts(run, tmp_path):
    """Two submitted annotations of one task that pick different classes conflict, unless
    one of them is marked ground truth."""
    task = {
        "data": {"sample_id": 1004, "audio": "x", "epoch": 2},
        "predictions": [{"result": [{"to_name": "audio"}]}],
    }
    export = tmp_path / "export.json"
    export.write_text(json.dumps([export_task(task, 9, [(["a"], False), (["b"], False)])]))
    labels = read_labels(run["root"] / "labels.csv")
    with pytest.raises(RelabelError, match=r"conflicting decisions: 1004: a .*task 9.* b "):
        apply_decisions(labels, read_decisions(export))
    agreeing = tmp_path / "agreeing.json"
    agreeing.write_text(json.dumps([export_task(task, 9, [(["a"], False), (["a"], False)])]))
    corrected, audit = apply_decisions(labels, read_decisions(agreeing))
    assert audit["new_label"].tolist() == ["a"] and audit["changed"].tolist() == [True]
    settled = export_task(task, 9, [(["a"], False), (["b"], False)])
    settled["annotations"][1]["ground_truth"] = True  # Label Studio's way to settle it
    export.write_text(json.dumps([settled]))
    corrected, audit = apply_decisions(labels, read_decisions(export))
    assert audit[["new_label", "decision_source"]].values.tolist() == [
        ["b", "label-studio:export.json (ground truth)"]
    ]


def test_apply_never_writes_over_its_inputs(run, tmp_path, capsys):
    """-o or --audit naming the labels, a decisions file or a file of the candidates'
    outputs (any epoch's) is refused."""
    labels = run["root"] / "labels.csv"
    decisions = tmp_path / "decisions.csv"
    pd.DataFrame({"sample_id": ["1004"], "decision": ["b"]}).to_csv(decisions, index=False)
    before = labels.read_bytes(), decisions.read_bytes()
    base = ["apply", "--labels", str(labels), "--decisions", str(decisions)]
    for extra in (
        ["-o", str(labels)],
        ["-o", str(tmp_path / "ok.csv"), "--audit", str(decisions)],
        ["-o", str(run["out"] / "epoch=2" / "x.csv"), "--candidates", str(run["out"])],
        ["-o", str(run["out"] / "epoch=0" / "candidates.csv"), "--candidates", str(run["out"])],
    ):
        assert main([*base, *extra]) == 2
        assert "refusing to write" in capsys.readouterr().err
    assert (labels.read_bytes(), decisions.read_bytes()) == before


def test_log_wandb_refuses_clearly_when_wandb_is_offline(run, tmp_path, capsys):
    """--log-wandb in offline mode exits 2 with a message, before writing anything."""
    decisions = tmp_path / "decisions.csv"
    pd.DataFrame({"sample_id": ["1004"], "decision": ["b"]}).to_csv(decisions, index=False)
    output = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(decisions)]
    assert (
        main([*argv, "-o", str(output), "--candidates", str(run["out"]), "--log-wandb", "me/p"])
        == 2
    )
    assert "--log-wandb needs an online W&B (the mode is 'offline'" in capsys.readouterr().err
    assert not output.exists()


def test_class_indices_are_mapped_through_the_class_names(tmp_path, capsys):
    """Labels stored as indices stay indices; without class names they are refused."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,target\n7,0\n8,2\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision,suggested_name\n7,accept,c\n8,b,\n")
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions), "--label-column"]
    out = tmp_path / "corrected.csv"
    assert main([*argv, "target", "-o", str(out), "--class-names", *NAMES]) == 0
    assert out.read_text() == "sample_id,target\n7,2\n8,1\n"
    assert main([*argv, "target", "-o", str(tmp_path / "x.csv")]) == 2
    assert "the labels look like class indices; pass the class names" in capsys.readouterr().err
    assert main([*argv, "target", "-o", str(tmp_path / "x.csv"), "--class-names", "a", "b"]) == 2
    assert "class indices up to 2, but only 2 class names" in capsys.readouterr().err


def test_formula_cells_are_neutralised_in_csv_and_ids_round_trip(tmp_path, capsys):
    """Ids that look like formulas are quoted in the audit and read back exactly from a review."""
    labels = tmp_path / "labels.csv"
    ids = ["=1+2", "-3", "@x", "'q"]
    pd.DataFrame({"sample_id": ids, "label": ["a", "b", "c", "a"]}).to_csv(labels, index=False)
    review = tmp_path / "review.csv"  # as `labelwatch candidates` writes it, then reviewed
    decided = pd.DataFrame({"sample_id": ["=1+2", "-3", "'q"], "decision": ["b", "c", "b"]})
    to_csv_safe(decided).to_csv(review, index=False)
    assert "'=1+2" in review.read_text() and "''q" in review.read_text()
    out = tmp_path / "corrected.csv"
    assert main(["apply", "--labels", str(labels), "--decisions", str(review), "-o", str(out)]) == 0
    # The corrected labels are a data file, cell for cell as read; the audit is quoted.
    assert out.read_text() == "sample_id,label\n=1+2,b\n-3,c\n@x,c\n'q,b\n"
    audit = pd.read_csv(tmp_path / "corrected.audit.csv", dtype=str)
    assert audit["sample_id"].tolist() == ["'=1+2", "'-3", "''q"]


def test_ids_with_a_carriage_return_keep_their_rows_in_every_csv(tmp_path, capsys):
    """pandas writes a cell holding a bare carriage return unquoted and reads it back as a
    line break: the candidates CSV, the corrected labels and the audit quote such cells."""
    from labelwatch.candidates import write_table

    ids = ["a\rb", "c", "=d"]
    labels = tmp_path / "labels.csv"
    frame = pd.DataFrame({"sample_id": ids, "label": ["x", "y", "x"]})
    frame.to_csv(labels, index=False, quoting=csv.QUOTE_ALL)  # as a spreadsheet would
    review = tmp_path / "review.csv"
    write_table(frame.assign(decision=["y", "", "y"], epoch=3), review, "csv")
    back = from_csv_safe(pd.read_csv(review, dtype=str, keep_default_na=False))
    assert back["sample_id"].tolist() == ids and back["epoch"].tolist() == ["3"] * 3
    out = tmp_path / "corrected.csv"
    assert main(["apply", "--labels", str(labels), "--decisions", str(review), "-o", str(out)]) == 0
    corrected = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert corrected.values.tolist() == [["a\rb", "y"], ["c", "y"], ["=d", "y"]]
    audit = from_csv_safe(pd.read_csv(tmp_path / "corrected.audit.csv", dtype=str))
    assert audit["sample_id"].tolist() == ["a\rb", "=d"]


def test_decisions_other_than_csv_or_label_studio_json_are_refused(run, tmp_path, capsys):
    """A pickle (or any other file type) is never loaded."""
    pickled = tmp_path / "decisions.pkl"
    pickled.write_bytes(b"\x80\x04K\x01.")
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(pickled)]
    assert main([*argv, "-o", str(tmp_path / "c.csv")]) == 2
    assert "decisions must be a reviewed candidates .csv or .json, or a Label Studio" in (
        capsys.readouterr().err
    )


def test_labels_that_are_not_the_class_names_are_refused(tmp_path, capsys):
    """A model trained without class_names calls its classes '0', '1', '2': accepting its
    suggestion must not write '1' into a labels file of names."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\n7,cat\n8,dog\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision,suggested_name\n7,accept,1\n")
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions), "-o", str(out)]
    assert main([*argv, "--class-names", "0", "1", "2"]) == 2
    err = capsys.readouterr().err
    assert "none of the labels in the labels file is among the class names" in err
    assert "['0', '1', '2'] (pass the class names" in err and "label column): cat, dog" in err
    assert not out.exists()
    # a file of class names with an odd marker among them still applies
    labels.write_text("sample_id,label\n7,1\n8,unknown\n")
    assert main([*argv, "--class-names", "0", "1", "2"]) == 0
    assert read_labels(out)["label"].tolist() == ["1", "unknown"]


def test_spreadsheet_csv_with_semicolons_applies_and_other_formats_are_named(tmp_path, capsys):
    """A decisions file saved with ';' (a spreadsheet's CSV in many locales) is read; a
    parquet labels file, a non-UTF-8 file and a non-CSV output get errors that say so."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id;label\r\n7;cat\r\n8;dog\r\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_bytes("\ufeffsample_id;decision\r\n7;dog\r\n".encode())
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions)]
    assert main([*argv, "-o", str(out)]) == 0
    assert read_labels(out)["label"].tolist() == ["dog", "dog"]
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "corrected.parquet")]) == 2
    assert "name them .csv, not 'corrected.parquet'" in capsys.readouterr().err
    pd.DataFrame({"sample_id": [7], "label": ["cat"]}).to_parquet(tmp_path / "labels.parquet")
    parquet = ["apply", "--labels", str(tmp_path / "labels.parquet"), "--decisions"]
    assert main([*parquet, str(decisions), "-o", str(tmp_path / "c2.csv")]) == 2
    assert "labels.parquet is not a CSV file: save it as CSV (UTF-8)" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("sample_id,label\n7,caf\xe9\n".encode("latin-1"))
    assert main(["apply", "--labels", str(latin), "--decisions", str(decisions), "-o", str(out)])
    assert "latin.csv is not UTF-8 text" in capsys.readouterr().err


def test_reviewed_json_and_a_pandas_table_of_decisions_apply(run, tmp_path, capsys):
    """`candidates -o review.json` with decisions added applies like the CSV; so does
    load_candidates(...) with a decision column, passed to apply_decisions directly."""
    from labelwatch import load_candidates

    review = tmp_path / "review.json"
    assert main(["candidates", str(run["out"]), "--top", "2", "-o", str(review)]) == 0
    items = json.loads(review.read_text())
    for item in items:
        item["decision"] = "accept"
    review.write_text(json.dumps(items))
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(review)]
    assert main([*argv, "-o", str(out)]) == 0
    assert "applied 2 decisions" in capsys.readouterr().out
    from_json = read_labels(out)

    table = load_candidates(run["out"]).head(2)
    table["decision"] = "accept"
    corrected, audit = apply_decisions(read_labels(run["root"] / "labels.csv"), table)
    pd.testing.assert_frame_equal(corrected, from_json)
    assert audit["new_label"].tolist() == table["suggested_name"].tolist()


def test_a_reviewed_json_may_decide_some_items_and_one_without_decisions_is_named(
    run, tmp_path, capsys
):
    """Items without a decision are no decision; a list with none at all (a Label Studio
    JSON_MIN export, or a review not filled in) is refused with what to do."""
    review = tmp_path / "review.json"
    assert main(["candidates", str(run["out"]), "--top", "3", "-o", str(review)]) == 0
    items = json.loads(review.read_text())
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(review)]
    assert main([*argv, "-o", str(tmp_path / "none.csv")]) == 2
    assert "lists samples but no 'decision'" in capsys.readouterr().err
    items[0]["decision"] = "accept"
    review.write_text(json.dumps(items))
    assert main([*argv, "-o", str(tmp_path / "one.csv")]) == 0
    assert "applied 1 decisions: 1 labels changed" in capsys.readouterr().out


def test_accepts_take_suggestions_only_from_candidates_of_their_own_run_and_epoch(
    run, tmp_path, capsys
):
    """A review without its suggested_name column takes each accept's suggestion from
    --candidates: those of another epoch or another run are refused, not silently used."""
    review = tmp_path / "review.csv"
    assert main(["candidates", str(run["out"]), "--top", "2", "-o", str(review)]) == 0
    table = pd.read_csv(review, dtype=str, keep_default_na=False)
    table["decision"] = "accept"
    table.drop(columns="suggested_name").to_csv(review, index=False)
    argv = ["apply", "--labels", str(run["root"] / "labels.csv"), "--decisions", str(review)]
    argv += ["--candidates", str(run["out"])]
    assert main([*argv, "--epoch", "0", "-o", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "'accept' decided on another epoch than the candidates' (0)" in err
    assert f"{table['sample_id'][0]} (csv:review.csv, line 2): epoch 2" in err
    table.assign(run="someotherrun").drop(columns="suggested_name").to_csv(review, index=False)
    assert main([*argv, "-o", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert f"'accept' decided on another run than the candidates' ({run['run_id']})" in err
    assert not (tmp_path / "x.csv").exists()
    table.drop(columns="suggested_name").to_csv(review, index=False)
    out = tmp_path / "corrected.csv"
    assert main([*argv, "-o", str(out)]) == 0  # the right run and epoch
    corrected = read_labels(out).set_index("sample_id")["label"]
    assert corrected[table["sample_id"]].tolist() == table["suggested_name"].tolist()


def test_apply_decisions_keeps_integer_class_indices_integers():
    """From Python, labels read as integers come back as integers of the same dtype."""
    labels = pd.DataFrame({"sample_id": [7, 8, 9], "target": [0, 2, 1]})
    decisions = pd.DataFrame({"sample_id": [7, 8], "decision": ["accept", "b"]})
    decisions["suggested_name"] = ["c", None]
    corrected, audit = apply_decisions(labels, decisions, class_names=NAMES, label_column="target")
    assert corrected["target"].dtype == labels["target"].dtype
    assert corrected["target"].tolist() == [2, 1, 1]
    assert audit["changed"].tolist() == [True, True]


def test_ids_match_whatever_spaces_surround_them_in_either_file(tmp_path, capsys):
    """A spreadsheet may keep spaces around ids: the labels' ids are compared as the
    decisions' are (stripped), from a review, a Label Studio export or the candidates'
    suggestions alike, and the corrected file keeps its cells as they were."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\n a,x\nb ,x\nc,y\n")
    review = tmp_path / "review.csv"
    review.write_text("sample_id,decision\na ,y\n b,y\n")
    task = {"data": {"sample_id": "a "}, "predictions": [{"result": [{"to_name": "audio"}]}]}
    export = tmp_path / "export.json"
    export.write_text(json.dumps([export_task(task, 1, [(["y"], False)])]))
    out = tmp_path / "corrected.csv"
    for decisions in (review, export):
        argv = ["apply", "--labels", str(labels), "--decisions", str(decisions)]
        assert main([*argv, "-o", str(out)]) == 0
        assert out.read_text().startswith("sample_id,label\n a,y\n")
    assert out.read_text() == "sample_id,label\n a,y\nb ,x\nc,y\n"
    accepted = pd.DataFrame({"sample_id": [" b"], "decision": ["accept"]})
    candidates = pd.DataFrame({"sample_id": ["b  "], "suggested_name": ["y"]})
    corrected, _ = apply_decisions(read_labels(labels), accepted, candidates=candidates)
    assert corrected["label"].tolist() == ["x", "y", "y"]


def test_the_corrected_labels_keep_the_labels_files_form(tmp_path, capsys):
    """A labels file saved with ';', a byte-order mark, CRLF line ends and an empty and a
    repeated header cell comes back in that form, with only the decided cell changed."""
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffsample_id;label;;note;note\r\n7;cat;;x;y\r\n8;dog;;;\r\n".encode())
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision\n7,dog\n")
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions), "-o", str(out)]
    assert main(argv) == 0
    expected = "\ufeffsample_id;label;;note;note\r\n7;dog;;x;y\r\n8;dog;;;\r\n".encode()
    assert out.read_bytes() == expected
    # the audit is a report, comma-separated whatever the labels file uses
    assert (tmp_path / "corrected.audit.csv").read_text().startswith("sample_id,old_label,")


def test_every_refused_decision_is_listed_one_a_line_when_there_are_many(tmp_path, capsys):
    """A reviewer fixes the whole spreadsheet in one pass: 30 unknown class names are all
    named, with their lines, one a line."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\n" + "".join(f"s{i},a\n" for i in range(30)) + "x,b\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision\n" + "".join(f"s{i},B\n" for i in range(30)))
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions)]
    assert main([*argv, "-o", str(tmp_path / "corrected.csv")]) == 2
    err = capsys.readouterr().err
    assert "pass --class-names or --candidates to name them all): 30 of them:\n" in err
    for i in range(30):
        assert f"\n    'B' for s{i} (csv:decisions.csv, line {i + 2})\n" in err + "\n"


def test_apply_decisions_takes_labels_read_by_plain_pandas_with_empty_cells():
    """pandas.read_csv makes an empty label NaN and a column of indices with one empty
    cell floats: they apply as the CLI applies the empty cells ('' is unlabelled), and the
    indices stay floats."""
    names = pd.read_csv(io.StringIO("sample_id,label\na,\nb,siren\nc,drill\n"))
    decisions = pd.DataFrame({"sample_id": ["a", "b"], "decision": ["drill", "drill"]})
    corrected, audit = apply_decisions(names, decisions)
    assert corrected["label"].tolist() == ["drill", "drill", "drill"]
    assert audit["old_label"].tolist() == ["", "siren"]
    indices = pd.read_csv(io.StringIO("sample_id,label\na,\nb,0\nc,1\n"))
    assert indices["label"].dtype == float
    corrected, _ = apply_decisions(indices, decisions, class_names=["siren", "drill"])
    assert corrected["label"].dtype == float and corrected["label"].tolist() == [1.0, 1.0, 1.0]


def test_a_categorical_label_column_gains_the_new_class_as_a_category():
    """A relabel to a class outside a Categorical column's categories adds the category;
    a Categorical of class indices takes the new index."""
    labels = pd.DataFrame({"sample_id": ["a", "b"], "label": pd.Categorical(["siren", "drill"])})
    decisions = pd.DataFrame({"sample_id": ["a"], "decision": ["dog_bark"]})
    corrected, _ = apply_decisions(labels, decisions, class_names=["siren", "drill", "dog_bark"])
    assert corrected["label"].tolist() == ["dog_bark", "drill"]
    assert list(corrected["label"].cat.categories) == ["drill", "siren", "dog_bark"]
    assert labels["label"].tolist() == ["siren", "drill"]  # the input is left as it was
    indices = labels.assign(label=pd.Categorical([0, 1]))
    corrected, _ = apply_decisions(indices, decisions, class_names=["siren", "drill", "dog_bark"])
    assert corrected["label"].tolist() == [2, 1]
    assert list(corrected["label"].cat.categories) == [0, 1, 2]


def test_errors_name_the_line_of_the_file_a_row_is_on(tmp_path, capsys):
    """A cell over several lines and a blank line do not shift the line numbers that
    errors give; a row with more cells than the header is named by its line."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\n10,siren\n11,drill\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        'sample_id,decision,comment\n10,reject,"first\nsecond\nthird"\n\n11,Sirne,typo\n'
    )
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions)]
    assert main([*argv, "-o", str(tmp_path / "corrected.csv")]) == 2
    assert "'Sirne' for 11 (csv:decisions.csv, line 6)" in capsys.readouterr().err
    decisions.write_text("sample_id,decision\n10,reject\n11,siren,extra\n")
    assert main([*argv, "-o", str(tmp_path / "corrected.csv")]) == 2
    assert "decisions.csv, line 3: 3 cells, but the header has 2" in capsys.readouterr().err


def test_labels_compare_stripped_and_a_class_in_another_case_gets_a_hint(tmp_path, capsys):
    """' siren ' in the labels file is the class siren (its cell is kept where unchanged);
    a decision 'Siren' is unknown, with a hint at the class it differs from only in case."""
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\na, siren \nb,drill\nc, siren \n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision\nb,siren\nc,reject\n")
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions), "-o", str(out)]
    assert main(argv) == 0
    assert out.read_text() == "sample_id,label\na, siren \nb,siren\nc, siren \n"
    assert "1 labels changed, 1 kept" in capsys.readouterr().out
    decisions.write_text("sample_id,decision\nb,Siren\n")
    assert main(argv) == 2
    assert "case-sensitive: did you mean 'siren' for 'Siren'?" in capsys.readouterr().err


def test_candidates_piped_into_a_reader_that_stops_exits_quietly(run, tmp_path):
    """`labelwatch candidates ... | head`: when the reader has gone, the command still
    writes its -o file and exits without a traceback, with the status SIGPIPE gives."""
    review = tmp_path / "review.csv"
    command = [sys.executable, "-m", "labelwatch.cli", "candidates", str(run["out"])]
    child = subprocess.Popen(
        [*command, "-o", str(review)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # the reader is gone before the command prints anything
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141, err
    assert err == "" and review.is_file()


def test_a_labels_file_that_names_its_ids_otherwise_is_read_with_id_column(tmp_path, capsys):
    """UrbanSound8K's metadata names the clip slice_file_name and its class `class`: with
    --id-column and --label-column it is corrected in place, its header kept."""
    labels = tmp_path / "UrbanSound8K.csv"
    labels.write_text("slice_file_name,fold,class\na.wav,1,dog_bark\nb.wav,2,siren\n")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("sample_id,decision\na.wav,siren\n")
    out = tmp_path / "corrected.csv"
    argv = ["apply", "--labels", str(labels), "--decisions", str(decisions), "-o", str(out)]
    assert main([*argv, "--label-column", "class", "--id-column", "slice_file_name"]) == 0
    assert out.read_text() == "slice_file_name,fold,class\na.wav,1,siren\nb.wav,2,siren\n"
    assert main([*argv, "--label-column", "class"]) == 2
    assert "choose the column of LabelWatch's sample ids with --id-column" in (
        capsys.readouterr().err
    )
