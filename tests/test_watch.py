"""Watch scores: how far a sample's embedding leans toward a class its label leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from labelwatch import LabelWatch
from labelwatch.cli import main
from labelwatch.watch import MIN_CLASS_SAMPLES, watch_scores, watched_indices
from tests.helpers import (
    TinyClassifier,
    finish_wandb,
    loaders,
    offline_run_dir,
    trainer_kwargs,
    wandb_records,
)

DOG, SIREN, DRILL = 0, 1, 2
CLASS_NAMES = ["dog_bark", "siren", "drilling"]


def _clusters(per_class: int = 40, dims: int = 8, seed: int = 0):
    """Three classes around orthogonal centres; the first 3 dog barks also hold a siren."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3 * per_class) % 3
    centres = torch.eye(3, dims) * 4
    embeddings = centres[labels] + 0.5 * torch.randn(len(labels), dims, generator=generator)
    hidden = torch.tensor([0, 3, 6])  # labelled dog (index % 3 == 0)
    embeddings[hidden] += 0.7 * centres[SIREN]
    return embeddings, labels, hidden


def test_dog_barks_hiding_a_siren_score_highest_and_above_three():
    embeddings, labels, hidden = _clusters()
    scores = watch_scores(embeddings, labels, [SIREN], 3)[:, 0]
    dogs = torch.nonzero(labels == DOG).flatten()
    top = dogs[scores[dogs].argsort(descending=True)[:3]]
    assert sorted(top.tolist()) == hidden.tolist()
    assert (scores[hidden] >= 3).all()
    others = torch.ones(len(labels), dtype=torch.bool)
    others[hidden] = False
    others &= labels != SIREN
    assert (scores[others] < 3).float().mean() > 0.95
    # the watched class's own samples have no score; the others are z-scores per label
    assert scores[labels == SIREN].isnan().all()
    drills = scores[labels == DRILL]
    assert abs(float(drills.quantile(0.5))) < 1e-5


def test_a_sample_unlike_its_label_but_not_like_the_watched_class_is_not_flagged():
    """A drill labelled dog_bark is far from the dog barks, but no closer to the sirens:
    only what sets sirens apart from dog barks counts, not distance from the dog barks."""
    embeddings, labels, hidden = _clusters()
    drill = torch.nonzero(labels == DRILL).flatten()[0]
    labels = labels.clone()
    labels[drill] = DOG
    scores = watch_scores(embeddings, labels, [SIREN], 3)[:, 0]
    assert scores[drill] < 3 <= scores[hidden].min()
    # the plain difference of the means would have flagged it
    e = torch.nn.functional.normalize(embeddings, dim=1)
    means = torch.stack([e[labels == c].mean(0) for c in range(3)])
    plain = e[labels == DOG] @ (means[SIREN] - means[DOG])
    dog_rows = torch.nonzero(labels == DOG).flatten()
    assert plain.argmax() == (dog_rows == drill).nonzero().item()


def test_what_the_predicted_class_explains_does_not_count():
    """Drills sound a little like sirens here. A drill labelled dog_bark leans toward the
    sirens as far as any drill does; the model predicts drilling, and once the drills'
    part is taken out, it does not lean at all. The hidden sirens, predicted dog_bark,
    still do."""
    embeddings, labels, hidden = _clusters()
    embeddings[labels == DRILL] += torch.eye(3, 8)[SIREN] * 4
    drill = torch.nonzero(labels == DRILL).flatten()[0]
    labels = labels.clone()
    labels[drill] = DOG
    predicted = labels.clone()
    predicted[drill] = DRILL
    label_only = watch_scores(embeddings, labels, [SIREN], 3)[:, 0]
    scores = watch_scores(embeddings, labels, [SIREN], 3, predictions=predicted)[:, 0]
    assert label_only[drill] >= 3 and scores[drill] < 1
    assert (scores[hidden] >= 3).all()
    # predictions that agree with the labels, or name the watched class, change nothing
    as_labelled = watch_scores(embeddings, labels, [SIREN], 3, predictions=labels)
    torch.testing.assert_close(as_labelled[:, 0], label_only, equal_nan=True)
    predicted[drill] = SIREN
    as_siren = watch_scores(embeddings, labels, [SIREN], 3, predictions=predicted)[:, 0]
    torch.testing.assert_close(as_siren, label_only, equal_nan=True)


def test_scores_do_not_depend_on_a_samples_scale_or_the_chunk_size():
    """Cosine geometry: a louder clip (a larger embedding) scores the same."""
    embeddings, labels, _ = _clusters()
    scales = torch.rand(len(labels), 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    predicted = (labels + (torch.arange(len(labels)) % 5 == 0).long()) % 3  # a fifth wrong
    expected = watch_scores(embeddings, labels, [SIREN, DRILL], 3, predictions=predicted)
    torch.testing.assert_close(
        watch_scores(
            embeddings * scales, labels, [SIREN, DRILL], 3, predictions=predicted, chunk_rows=7
        ),
        expected,
        equal_nan=True,
        atol=1e-4,
        rtol=1e-4,
    )
    assert expected.shape == (len(labels), 2)
    assert expected.dtype == torch.float32
    assert expected[labels == DRILL, 1].isnan().all()


def test_no_score_where_a_label_has_too_few_samples_no_spread_or_no_watched_samples():
    embeddings, labels, _ = _clusters()
    few = torch.cat([embeddings, torch.randn(MIN_CLASS_SAMPLES - 1, 8)])
    few_labels = torch.cat([labels, torch.full((MIN_CLASS_SAMPLES - 1,), 3)])
    scores = watch_scores(few, few_labels, [SIREN], 4)[:, 0]
    assert scores[few_labels == 3].isnan().all()
    assert not scores[few_labels == DOG].isnan().any()
    # every drill embedding the same: no spread to measure a lean against
    same = embeddings.clone()
    same[labels == DRILL] = same[labels == DRILL][0]
    assert watch_scores(same, labels, [SIREN], 3)[labels == DRILL].isnan().all()
    # no sample labelled siren: nothing to lean toward
    no_siren = labels != SIREN
    scores = watch_scores(embeddings[no_siren], labels[no_siren], [SIREN], 3)
    assert scores.isnan().all()


def test_an_embedding_without_direction_has_no_score_and_moves_no_other():
    """An all-zero or non-finite embedding gets NaN and is left out of the class means and
    medians: the other samples score as if it were not there (one NaN would otherwise
    spread to every class mean)."""
    embeddings, labels, hidden = _clusters()
    predicted = (labels + (torch.arange(len(labels)) % 5 == 0).long()) % 3
    expected = watch_scores(embeddings, labels, [SIREN, DRILL], 3, predictions=predicted)
    bad = torch.zeros(4, 8)
    bad[1, 2], bad[2, 5], bad[3] = torch.nan, torch.inf, 1e5
    with_bad = torch.cat([bad.half().float(), embeddings])  # 1e5: a float16 overflow
    scores = watch_scores(
        with_bad,
        torch.cat([torch.tensor([DOG, DOG, SIREN, DRILL]), labels]),
        [SIREN, DRILL],
        3,
        predictions=torch.cat([torch.tensor([DOG, SIREN, SIREN, DOG]), predicted]),
    )
    assert scores[:4].isnan().all()
    torch.testing.assert_close(scores[4:], expected, equal_nan=True, rtol=0, atol=0)
    assert scores[4 + hidden, 0].min() >= 3


def test_bad_inputs_are_clear_errors():
    embeddings, labels, _ = _clusters()
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
        watch_scores(embeddings, labels, [SIREN], 2)
    with pytest.raises(ValueError, match=r"watched classes \[5\] are not in \[0, 3\)"):
        watch_scores(embeddings, labels, [5], 3)
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        watch_scores(embeddings, labels[:-1], [SIREN], 3)
    with pytest.raises(ValueError, match="2-D tensor"):
        watch_scores(embeddings[0], labels, [SIREN], 3)
    with pytest.raises(ValueError, match=r"`predictions` must lie in \[0, 3\)"):
        watch_scores(embeddings, labels, [SIREN], 3, predictions=labels + 1)
    with pytest.raises(ValueError, match=r"`predictions` must be a tensor of shape \(120,\)"):
        watch_scores(embeddings, labels, [SIREN], 3, predictions=labels[:5])


def test_watched_classes_by_name_or_index():
    names = ["dog_bark", "siren", "drilling"]
    assert watched_indices(["siren", 2], names) == [1, 2]
    with pytest.raises(ValueError, match=r"names 'sirens', which is not a class: give one of"):
        watched_indices(["sirens"], names)
    with pytest.raises(ValueError, match="an index below 3"):
        watched_indices([3], names)
    with pytest.raises(ValueError, match=r"names \['siren'\] more than once"):
        watched_indices(["siren", 1], names)
    with pytest.raises(ValueError, match="True, which is not a class"):
        watched_indices([True], names)


class InputEmbeddings(TinyClassifier):
    """The inputs as the embeddings: what leans where is set by the data, not by training."""

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"logits": self(batch["x"]), "embeddings": batch["x"]}


class EarlyLeaning(InputEmbeddings):
    """The inputs as embeddings, with a siren behind the `leaning` rows in the first epoch
    only: later epochs no longer hear it, as a model that learns the annotators' habit."""

    leaning = [0, 3, 6]

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        out = super().validation_step(batch, batch_idx)
        if self.current_epoch == 0:
            rows = torch.isin(batch["sample_id"] - 1000, torch.tensor(self.leaning))
            siren = torch.eye(3, batch["x"].shape[1])[SIREN] * 4  # its blob's centre
            out["embeddings"] = out["embeddings"] + 0.5 * rows[:, None] * siren
        return out


def _tight_blobs(val) -> None:
    data = val.dataset
    centres = torch.eye(3, data.x.shape[1]) * 4  # the blobs' centres (tests.helpers)
    data.x = centres[data.targets] + 0.3 * (data.x - centres[data.targets])


def test_a_sample_that_leaned_in_its_first_validation_stays_a_candidate(tmp_path: Path):
    """Dog barks that lean toward the sirens in the first epoch only keep that first score
    (first_watch_siren) and stay watch candidates, also after a resume, which reads the
    first scores back from the last epoch's samples."""
    torch.manual_seed(0)
    train, val = loaders(num_val=60)
    _tight_blobs(val)
    ids = [1000 + i for i in EarlyLeaning.leaning]

    def fit(max_epochs: int, ckpt_path: Path | None = None) -> None:
        callback = LabelWatch(class_names=CLASS_NAMES, projection="none", watch_classes=["siren"])
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        kwargs = trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True)
        Trainer(**{**kwargs, "callbacks": [callback, checkpoint]}).fit(
            EarlyLeaning(), train, val, ckpt_path=ckpt_path
        )

    fit(max_epochs=2)
    fit(max_epochs=3, ckpt_path=tmp_path / "ckpt/last.ckpt")
    epochs = [
        pd.read_parquet(tmp_path / f"labelwatch/epoch={e}/samples.parquet").set_index("sample_id")
        for e in range(3)
    ]
    assert (epochs[0].loc[ids, "watch_siren"] >= 3).all()
    for later in epochs[1:]:
        assert (later.loc[ids, "watch_siren"] < 3).all()  # no longer leaning now
        pd.testing.assert_series_equal(
            later["first_watch_siren"], epochs[0]["watch_siren"], check_names=False
        )
        assert later.loc[ids, "is_watch_candidate"].all()
        assert later.loc[ids, "is_candidate"].all()
        # flagged by either score, and by nothing else
        leans = later[["watch_siren", "first_watch_siren"]].max(axis=1) >= 3
        pd.testing.assert_series_equal(later["is_watch_candidate"], leans, check_names=False)


@pytest.fixture(scope="module")
def watch_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch fit watching sirens, 3 of whose dog barks hide one; W&B offline. Returns
    the W&B save_dir and LabelWatch's outputs folder."""
    tmp_path = tmp_path_factory.mktemp("watch-fit")
    torch.manual_seed(0)  # the model's initial weights: the same run whatever ran before
    train, val = loaders(num_val=60)
    leaning = [0, 3, 6]  # labelled dog_bark (index % 3 == 0); ids 1000, 1003, 1006
    _tight_blobs(val)
    data = val.dataset
    data.x[leaning] += 0.5 * torch.eye(3, data.x.shape[1])[SIREN] * 4  # a siren at half volume
    callback = LabelWatch(
        class_names=CLASS_NAMES, projection="none", watch_classes=["siren"], max_candidates=1
    )
    logger = WandbLogger(project="labelwatch-tests", save_dir=str(tmp_path), offline=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], logger=logger))
    trainer.fit(InputEmbeddings(), train, val)
    finish_wandb()
    return tmp_path, callback.output_root


def test_a_fit_that_watches_sirens_makes_the_leaning_dog_barks_candidates(watch_fit):
    """In a real fit: a watch_siren column, the leaning dog barks flagged as candidates
    (kept beyond max_candidates, suggested as siren), and the summary, the W&B table and
    the artifact's metadata say so."""
    save_dir, outputs = watch_fit
    out = outputs / "epoch=1"
    samples = pd.read_parquet(out / "samples.parquet").set_index("sample_id")
    assert list(samples.columns[-3:]) == [
        "watch_siren",
        "first_watch_siren",
        "is_watch_candidate",
    ]
    first = pd.read_parquet(outputs / "epoch=0" / "samples.parquet").set_index("sample_id")
    pd.testing.assert_series_equal(
        samples["first_watch_siren"], first["watch_siren"], check_names=False
    )
    dogs = samples[samples["given_name"] == "dog_bark"]
    top = dogs["watch_siren"].nlargest(3).index
    assert sorted(top) == [1000, 1003, 1006]
    assert samples.loc[top, "is_watch_candidate"].all()
    assert samples.loc[top, "is_candidate"].all()
    assert samples.loc[samples["given_name"] == "siren", "watch_siren"].isna().all()
    flagged = samples[samples["is_watch_candidate"]]
    assert (flagged[["watch_siren", "first_watch_siren"]].max(axis=1) >= 3).all()
    candidates = pd.read_parquet(out / "candidates.parquet").set_index("sample_id")
    assert set(flagged.index) <= set(candidates.index)  # the budget of 1 drops none of them
    assert candidates["label_quality"].is_monotonic_increasing
    only_watched = candidates[
        candidates["is_watch_candidate"] & ~candidates["is_mixed_confident_mismatch"]
    ]
    only_watched = only_watched[only_watched["knn_agreement"] >= 0.2]
    assert len(only_watched) and (only_watched["suggested_name"] == "siren").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["watch_classes"] == ["siren"]
    assert summary["min_watch_score"] == 3.0
    assert summary["num_watch_flagged"] == len(flagged)

    run_dir = offline_run_dir(save_dir)
    tables = (run_dir / "files/media/table/labelwatch").glob("samples_*.table.json")
    last = max(tables, key=lambda path: int(path.name.split("_")[1]))  # samples_<step>_...
    logged = json.loads(last.read_text())
    assert {"watch_siren", "is_watch_candidate"} <= set(logged["columns"])
    (log_file,) = run_dir.glob("*.wandb")
    (metadata, *_) = [
        json.loads(r.artifact.metadata)
        for r in reversed(list(wandb_records(log_file)))
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "relabel-candidates"
    ]
    assert metadata["watch_classes"] == ["siren"]
    assert metadata["num_watch_flagged"] == len(flagged)


def test_no_column_of_the_outputs_can_be_taken_by_a_metadata_key(watch_fit):
    """Every column LabelWatch wrote (scores, history, watch scores, the candidates' rank,
    the W&B table's columns) is refused as a metadata key, which would overwrite it."""
    save_dir, outputs = watch_fit
    columns = set(pd.read_parquet(outputs / "epoch=1" / "candidates.parquet").columns)
    tables = (offline_run_dir(save_dir) / "files/media/table/labelwatch").glob("samples_*")
    columns |= set(json.loads(next(tables).read_text())["columns"])
    assert {"rank", "watch_siren", "first_watch_siren", "flag_streak"} <= columns
    for column in sorted(columns):
        with pytest.raises(ValueError, match="would overwrite columns that LabelWatch writes"):
            LabelWatch(metadata_keys=[column])


def test_cli_lists_the_candidates_leaning_toward_a_watched_class(watch_fit, tmp_path, capsys):
    """`labelwatch candidates SOURCE --leaning siren` keeps the watched flags, most leaning
    first; a class that was not watched is a clear error."""
    _, outputs = watch_fit
    target = tmp_path / "sirens.csv"
    assert main(["candidates", str(outputs), "--leaning", "siren", "-o", str(target)]) == 0
    written = pd.read_csv(target)
    flagged = pd.read_parquet(outputs / "epoch=1" / "samples.parquet")
    assert len(written) == int(flagged["is_watch_candidate"].sum()) >= 3
    assert written["is_watch_candidate"].all()
    furthest = written[["watch_siren", "first_watch_siren"]].max(axis=1)
    assert furthest.is_monotonic_decreasing
    assert sorted(written["sample_id"].head(3)) == [1000, 1003, 1006]
    assert {"watch_siren", "first_watch_siren"} <= set(capsys.readouterr().out.split())
    assert main(["candidates", str(outputs), "--leaning", "drilling"]) == 2
    assert "the run did not watch that class (watched: ['siren'])" in capsys.readouterr().err


def test_watch_classes_are_checked_before_training(tmp_path: Path):
    with pytest.raises(ValueError, match="`watch_classes` names 'sirens', which is not a class"):
        LabelWatch(class_names=CLASS_NAMES, watch_classes=["sirens"])
    with pytest.raises(ValueError, match="`watch_classes` must be a list"):
        LabelWatch(watch_classes="siren")
    with pytest.raises(ValueError, match="`min_watch_score` must be a finite number > 0, got 0"):
        LabelWatch(watch_classes=["siren"], min_watch_score=0)
    # without class names, the names are "0", "1", ...: the sanity check catches "siren"
    train, val = loaders()
    module = TinyClassifier()
    callback = LabelWatch(projection="none", watch_classes=["siren"])
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], num_sanity_val_steps=2))
    with pytest.raises(ValueError, match=r"give one of the class names \['0', '1', '2'\]"):
        trainer.fit(module, train, val)
    assert trainer.global_step == 0  # stopped before the first training step


def test_watching_without_embeddings_warns_and_flags_nothing(tmp_path: Path):
    train, val = loaders()
    callback = LabelWatch(
        class_names=CLASS_NAMES, projection="none", watch_classes=["siren"], embeddings_key="none"
    )
    with pytest.warns(UserWarning, match="`watch_classes` needs embeddings"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
            TinyClassifier(), train, val
        )
    samples = pd.read_parquet(tmp_path / "labelwatch" / "epoch=0" / "samples.parquet")
    assert samples["watch_siren"].isna().all()
    assert not samples["is_watch_candidate"].any()


def test_watch_scores_follow_their_samples_when_scoring_drops_rows(tmp_path: Path):
    """Rows left out of scoring (ignore_index targets) leave the other rows' embeddings
    aligned: each row's watch_siren is that of its own embedding among the scored rows."""
    torch.manual_seed(0)
    train, val = loaders(num_val=60)
    data = val.dataset
    data.labels[[4, 10, 20]] = -100  # unlabelled: skipped and counted
    callback = LabelWatch(class_names=CLASS_NAMES, projection="none", watch_classes=[1])
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        InputEmbeddings(), train, val
    )
    samples = pd.read_parquet(tmp_path / "labelwatch" / "epoch=0" / "samples.parquet")
    assert len(samples) == 57
    kept = torch.tensor(samples["sample_id"].to_numpy() - 1000)
    predicted = torch.tensor(samples["predicted_label"].to_numpy())
    expected = watch_scores(data.x[kept], data.labels[kept], [SIREN], 3, predictions=predicted)
    expected = expected[:, 0]
    torch.testing.assert_close(
        torch.tensor(samples["watch_siren"].to_numpy(), dtype=torch.float32),
        expected,
        equal_nan=True,
    )


def test_a_watched_class_no_validation_sample_has_is_warned_about(tmp_path: Path):
    """A watched class absent from the validation set left its columns NaN in silence."""
    from torch.utils.data import DataLoader, Subset

    from tests.helpers import BlobDataset

    train, _ = loaders()
    val = DataLoader(Subset(BlobDataset(48, seed=2), [i for i in range(48) if i % 3]), 16)
    callback = LabelWatch(projection="none", watch_classes=[0])
    with pytest.warns(UserWarning, match="no validation sample is labelled '0'"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
            TinyClassifier(), train, val
        )
    samples = pd.read_parquet(tmp_path / "labelwatch" / "epoch=0" / "samples.parquet")
    assert samples["watch_0"].isna().all()
