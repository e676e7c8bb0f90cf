"""Label Studio tasks, labelling configs and reading its JSON export, without training."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from labelwatch.candidates import CandidateSet
from labelwatch.labelstudio import fill_template, labeling_config, read_export, to_tasks


def _candidates() -> CandidateSet:
    frame = pd.DataFrame(
        {
            "rank": [1, 2],
            "sample_id": ["clip-7", "clip-2"],
            "epoch": [3, 3],
            "given_name": ["dog_bark", "siren"],
            "suggested_name": ["siren", "dog_bark"],
            "confidence": [0.97, 0.81],
            "label_quality": [0.01, 0.12],
            "x": [0.5, math.nan],
            "path": ["clips/dog bark #7.wav", "clips/2.wav"],
        }
    )
    return CandidateSet(
        frame, class_names=["dog_bark", "siren"], epoch=3, run="r1", wandb_run_id="r1"
    )


def export_task(task: dict, task_id: int, annotations: list[tuple[list[str], bool]]) -> dict:
    """A task as Label Studio's JSON export writes it (labelstud.io/guide/task_format)."""
    to_name = task["predictions"][0]["result"][0]["to_name"]
    return {
        "id": task_id,
        "data": task["data"],
        "annotations": [
            {
                "id": 100 * task_id + n,
                "completed_by": 1,
                "result": [
                    {
                        "id": f"r{task_id}{n}",
                        "from_name": "label",
                        "to_name": to_name,
                        "type": "choices",
                        "origin": "manual",
                        "value": {"choices": choices},
                    }
                ]
                if choices
                else [],
                "was_cancelled": cancelled,
                "ground_truth": False,
                "created_at": "2026-01-01T10:00:00.000000Z",
                "updated_at": "2026-01-01T10:00:00.000000Z",
                "lead_time": 4.2,
                "task": task_id,
                "project": 1,
            }
            for n, (choices, cancelled) in enumerate(annotations)
        ],
        "predictions": task["predictions"],
        "drafts": [],
        "meta": {},
        "project": 1,
        "created_at": "2026-01-01T09:00:00.000000Z",
        "updated_at": "2026-01-01T10:00:00.000000Z",
    }


def test_template_quotes_each_path_segment_and_fills_any_column():
    """Placeholders take the row's values, URL-quoted per segment, slashes kept."""
    row = {"path": "clips/dog bark #7.wav", "sample_id": "clip?7"}
    assert fill_template("https://host/audio/{path}", row) == (
        "https://host/audio/clips/dog%20bark%20%237.wav"
    )
    assert fill_template("/data/{sample_id}.wav", row) == "/data/clip%3F7.wav"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../secret.wav", "'..' segment"),
        ("clips/../../etc/passwd", "'..' segment"),
        ("clips\\..\\..\\x.wav", "'..' segment"),
        ("%2e%2e/x.wav", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("\\\\server\\share.wav", "absolute path"),
        ("C:/audio/x.wav", "absolute path"),
        ("", "has no 'path'"),
    ],
)
def test_template_refuses_media_paths_that_escape_the_root(path, message):
    """Absolute values and '..' segments (also encoded or with backslashes) are refused."""
    with pytest.raises(ValueError, match=message):
        fill_template("https://host/audio/{path}", {"path": path, "sample_id": 1})


def test_template_refuses_unknown_columns_and_other_braces():
    """A placeholder for a missing column, or attribute access, is an error."""
    with pytest.raises(ValueError, match=r"names \{file\}, which is not a candidate column"):
        fill_template("https://host/{file}", {"path": "a.wav"})
    with pytest.raises(ValueError, match="may only hold"):
        fill_template("https://host/{path.__class__}", {"path": "a.wav"})


@pytest.mark.parametrize(("media", "tag"), [("audio", "Audio"), ("image", "Image")])
def test_labeling_config_has_the_media_and_one_choice_per_class(media, tag):
    """The config is XML with the media tag, and a single-choice list of every class."""
    config = labeling_config(["dog_bark", 'a<b&"c"'], media)
    view = ET.fromstring(config)
    assert view.tag == "View"
    (medium,) = view.iter(tag)
    assert medium.attrib == {"name": media, "value": f"${media}"}
    (choices,) = view.iter("Choices")
    assert choices.attrib["name"] == "label" and choices.attrib["toName"] == media
    assert choices.attrib["choice"] == "single"
    assert [c.attrib["value"] for c in choices] == ["dog_bark", 'a<b&"c"']
    with pytest.raises(ValueError, match="`media` must be one of"):
        labeling_config(["a"], "video")


def test_tasks_carry_media_url_sample_id_metadata_and_the_suggestion():
    """One task per candidate: URL, id, scores, and the suggested label as a prediction."""
    tasks = to_tasks(_candidates(), data_template="https://host/audio/{path}", media="audio")
    json.dumps(tasks, allow_nan=False)  # valid JSON: NaN became null
    first = tasks[0]
    assert first["data"]["audio"] == "https://host/audio/clips/dog%20bark%20%237.wav"
    assert (
        first["data"]["sample_id"] == "clip-7" and first["data"]["path"] == "clips/dog bark #7.wav"
    )
    assert first["data"]["run"] == "r1" and first["data"]["x"] == 0.5
    assert tasks[1]["data"]["x"] is None
    assert "model suggests siren" in first["data"]["review_note"]
    (prediction,) = first["predictions"]
    assert prediction["model_version"] == "labelwatch:r1:epoch-3"
    assert prediction["score"] == pytest.approx(0.97)
    assert prediction["result"] == [
        {
            "from_name": "label",
            "to_name": "audio",
            "type": "choices",
            "value": {"choices": ["siren"]},
        }
    ]


def test_export_reader_keeps_submitted_annotations_and_ignores_cancelled_ones(tmp_path: Path):
    """Submitted choices become decisions; cancelled, empty and absent annotations do not."""
    tasks = to_tasks(_candidates(), data_template="{path}", media="image")
    exported = [
        export_task(tasks[0], 1, [(["dog_bark"], True), (["siren"], False)]),
        export_task(tasks[1], 2, [([], False)]),
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported))
    decisions = read_export(path)
    assert decisions[["sample_id", "action", "label"]].values.tolist() == [
        ["clip-7", "relabel", "siren"]
    ]
    assert decisions["decision_source"].tolist() == ["label-studio:export.json"]
    assert decisions["epoch"].tolist() == [3] and decisions["run"].tolist() == ["r1"]


def test_export_reader_refuses_other_shapes(tmp_path: Path):
    """A JSON_MIN-like object, tasks without sample_id and multi-class answers are refused."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"audio": "x", "label": "siren"}))
    with pytest.raises(ValueError, match="not a Label Studio JSON export"):
        read_export(path)
    task = export_task(to_tasks(_candidates(), data_template="{path}")[0], 5, [(["siren"], False)])
    del task["data"]["sample_id"]
    path.write_text(json.dumps([task]))
    with pytest.raises(ValueError, match="tasks without data.sample_id.*: 5"):
        read_export(path)
    task = export_task(to_tasks(_candidates(), data_template="{path}")[0], 6, [(["a", "b"], False)])
    path.write_text(json.dumps([task]))
    with pytest.raises(ValueError, match=r"pick several classes: clip-7 \(task 6\)"):
        read_export(path)


def test_the_review_note_says_where_the_suggestion_comes_from():
    """A suggestion that is not the model's argmax (a watched class's, say) is not put in
    the model's mouth, nor given the model's probability of another class as its score,
    and a watched class's lean is named with its score (the larger of now and the first
    validation's)."""
    found = _candidates()
    found.frame["predicted_name"] = ["siren", "dog_bark"]
    found.frame["watch_siren"] = [math.nan, 1.2]
    found.frame["first_watch_siren"] = [math.nan, 4.26]
    found.frame["is_watch_candidate"] = [False, True]
    found.frame.loc[1, ["given_name", "suggested_name"]] = ["dog_bark", "siren"]
    first, second = to_tasks(found, data_template="{path}")
    assert first["data"]["review_note"] == (
        "labelled dog_bark; model suggests siren (p=0.97); rank 1"
    )
    assert second["data"]["review_note"] == (
        "labelled dog_bark; suggested siren; model predicts dog_bark (p=0.81);"
        " leans toward siren (watch score 4.3); rank 2"
    )
    assert first["predictions"][0]["score"] == pytest.approx(0.97)
    assert "score" not in second["predictions"][0]
    assert second["predictions"][0]["result"][0]["value"] == {"choices": ["siren"]}


def test_an_export_whose_choices_are_all_unread_is_refused_naming_them(tmp_path: Path):
    """Choices under another from_name than the config's 'label', or only in drafts, are not
    decisions: an export with nothing else says so instead of applying none."""
    tasks = to_tasks(_candidates(), data_template="{path}")
    renamed = export_task(tasks[0], 1, [(["siren"], False)])
    renamed["annotations"][0]["result"][0]["from_name"] = "class"
    drafted = export_task(tasks[1], 2, [])
    drafted["drafts"] = [
        {
            "id": 5,
            "result": export_task(tasks[1], 2, [(["siren"], False)])["annotations"][0]["result"],
        }
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps([renamed, drafted]))
    with pytest.raises(ValueError, match="no submitted annotation picks a class") as raised:
        read_export(path)
    assert "task 1 chooses under from_name 'class'; task 2 has choices only in a draft" in str(
        raised.value
    )
    # once one task is answered as labelwatch's config asks, the others are no decision
    answered = export_task(tasks[0], 3, [(["siren"], False)])
    path.write_text(json.dumps([renamed, drafted, answered]))
    assert read_export(path)["origin"].tolist() == ["task 3, annotation 300"]


def test_the_ground_truth_annotation_settles_a_disagreement(tmp_path: Path):
    """Of annotators who disagree, the one annotation marked ground truth is the decision,
    and its source says so; two marked ones that disagree stay a conflict."""
    task = export_task(
        to_tasks(_candidates(), data_template="{path}")[0],
        4,
        [(["siren"], False), (["dog_bark"], False)],
    )
    task["annotations"][1]["ground_truth"] = True
    path = tmp_path / "export.json"
    path.write_text(json.dumps([task]))
    decisions = read_export(path)
    assert decisions[["label", "origin"]].values.tolist() == [
        ["dog_bark", "task 4, annotation 401"]
    ]
    assert decisions["decision_source"].tolist() == ["label-studio:export.json (ground truth)"]
    task["annotations"][0]["ground_truth"] = True
    path.write_text(json.dumps([task]))
    assert read_export(path)["label"].tolist() == ["siren", "dog_bark"]
