"""LabelWatch inside real Trainer runs: capture, outputs, W&B offline, bad input."""

from __future__ import annotations

import gc
import json
import math
import shlex
import warnings
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
)

from labelwatch import LabelWatch
from labelwatch.scoring import SAMPLE_COLUMNS
from tests.helpers import (
    BlobDataset,
    TinyClassifier,
    finish_wandb,
    loaders,
    offline_run_dir,
    trainer_kwargs,
    wandb_records,
)

CLASS_NAMES = ["dog_bark", "siren", "drilling"]


@pytest.fixture(scope="module")
def wandb_fit(tmp_path_factory: pytest.TempPathFactory, _wandb_offline):
    """One 2-epoch fit with a WandbLogger in offline mode and the default UMAP map."""
    root = tmp_path_factory.mktemp("wandb-fit")
    train, val = loaders(num_val=60, flip=6)
    callback = LabelWatch(class_names=CLASS_NAMES, metadata_keys=["path"])
    logger = WandbLogger(project="labelwatch-tests", save_dir=str(root), offline=True)
    trainer = Trainer(**trainer_kwargs(root, logger=logger, callbacks=[callback]))
    trainer.fit(TinyClassifier(), train, val)
    run_id = logger.experiment.id
    finish_wandb()
    return root, callback, run_id


def _table(path: Path) -> pd.DataFrame:
    table = json.loads(path.read_text())
    return pd.DataFrame(table["data"], columns=table["columns"])


def test_wandb_tables_have_every_column_and_one_row_per_sample(wandb_fit):
    """Each epoch's per-sample table holds all schema columns and all 60 samples."""
    root, _, _ = wandb_fit
    tables = sorted((offline_run_dir(root) / "files/media/table/labelwatch").glob("samples_*"))
    assert len(tables) == 2
    for epoch, path in enumerate(sorted(tables, key=lambda p: int(p.name.split("_")[1]))):
        frame = _table(path)
        assert set(SAMPLE_COLUMNS) <= set(frame.columns)
        assert len(frame) == 60 and frame["sample_id"].nunique() == 60
        assert (frame["epoch"] == epoch).all()
        assert frame["x"].notna().all() and frame["y"].notna().all()
        assert frame["path"].str.startswith("audio/").all()


def test_wandb_artifact_records_name_type_aliases_and_files(wandb_fit):
    """The run log holds one relabel-candidates artifact per epoch with its files."""
    root, _, run_id = wandb_fit
    (log_file,) = offline_run_dir(root).glob("*.wandb")
    artifacts = [
        r.artifact
        for r in wandb_records(log_file)
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "relabel-candidates"
    ]
    assert [a.name for a in artifacts] == [f"relabel-candidates-{run_id}"] * 2
    assert [sorted(a.aliases) for a in artifacts] == [["epoch-0", "latest"], ["epoch-1", "latest"]]
    for epoch, artifact in enumerate(artifacts):
        files = sorted(entry.path for entry in artifact.manifest.contents)
        assert files == ["candidates.csv", "candidates.parquet", "candidates.table.json"]
        metadata = json.loads(artifact.metadata)
        assert metadata["epoch"] == epoch
        assert metadata["class_names"] == CLASS_NAMES
        assert set(metadata["thresholds"]) == set(CLASS_NAMES)
        assert metadata["num_samples"] == 60
        assert metadata["num_nonfinite_embeddings"] == metadata["num_zero_embeddings"] == 0


def test_wandb_run_gets_summary_metrics(wandb_fit):
    """Candidate count, mismatch rate and mean entropy land in the run's history."""
    root, _, _ = wandb_fit
    (log_file,) = offline_run_dir(root).glob("*.wandb")
    keys = {
        item.key or item.nested_key[0]  # newer W&B writes keys as nested_key
        for r in wandb_records(log_file)
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert {
        "labelwatch/num_candidates",
        "labelwatch/mismatch_rate",
        "labelwatch/mean_entropy",
    } <= keys


def test_local_outputs_match_what_wandb_got(wandb_fit):
    """The local copy sits beside the run's checkpoints folder and has every file."""
    root, callback, run_id = wandb_fit
    out = root / "labelwatch-tests" / run_id / "labelwatch"
    for epoch in (0, 1):
        folder = out / f"epoch={epoch}"
        # the epoch history (for a resume) is kept beside the newest epoch only
        history = ["history.arrow"] if epoch == 1 else []
        assert sorted(p.name for p in folder.iterdir()) == [
            "candidates.csv",
            "candidates.parquet",
            *history,
            "samples.parquet",
            "summary.json",
        ]
        summary = json.loads((folder / "summary.json").read_text())
        candidates = pd.read_parquet(folder / "candidates.parquet")
        assert summary["num_candidates"] == len(candidates)
        assert summary["projection"] == "umap"
    assert callback.last_output_dir == out / "epoch=1"


def test_fit_without_logger_writes_local_outputs(tmp_path: Path):
    """No logger: results go to <default_root_dir>/labelwatch/epoch=<n>/."""
    train, val = loaders(flip=4, string_ids=True)
    callback = LabelWatch(class_names=CLASS_NAMES, projection="pca", every_n_epochs=1)
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).fit(TinyClassifier(), train, val)
    for epoch in (0, 1):
        samples = pd.read_parquet(tmp_path / "labelwatch" / f"epoch={epoch}" / "samples.parquet")
        assert len(samples) == 48
        assert samples["sample_id"].str.startswith("clip-").all()
        assert tuple(samples.columns) == (
            *SAMPLE_COLUMNS,
            "moved",
            "knn_agreement",
            "flag_streak",
            "averaged_self_confidence",
            "averaged_epochs",
            "is_mixed_confident_mismatch",
            "is_candidate",
        )
    candidates = pd.read_parquet(tmp_path / "labelwatch/epoch=1/candidates.parquet")
    assert candidates["rank"].tolist() == list(range(1, len(candidates) + 1))
    assert candidates["label_quality"].is_monotonic_increasing


def test_fit_end_says_how_many_candidates_and_where(tmp_path: Path, monkeypatch):
    """When fit returns, one line per dataloader gives its last epoch's candidates and
    the file that holds them."""
    import labelwatch.callback

    said: list[str] = []
    monkeypatch.setattr(labelwatch.callback, "rank_zero_info", said.append)
    train, val = loaders(flip=4)
    names = ["clean", "noisy set"]
    val = {name: val for name in names}  # two dataloaders, by name
    callback = LabelWatch(projection="none")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).fit(TinyClassifier(), train, val)
    lines = [line for line in said if "relabel candidates" in line]
    assert len(lines) == 2
    for name, line in zip(names, lines, strict=True):
        csv = tmp_path / "labelwatch" / name / "epoch=1" / "candidates.csv"
        count = len(pd.read_csv(csv))
        assert line.startswith(f"LabelWatch ({name}): {count} relabel candidates among 48")
        assert f"in epoch 1: {csv}" in line
        assert f"labelwatch candidates {shlex.quote(str(csv.parent.parent))} --top 20" in line


def test_mixed_precision_scores_the_logits_the_model_gave(tmp_path: Path):
    """Under autocast the logits come out in bfloat16 (Lightning's choice on a CPU for any
    16-bit mixed precision): the last epoch's scores are those of the final model's own
    bfloat16 logits, recomputed here the same way."""
    from labelwatch import score_predictions

    train, val = loaders(flip=4)
    model = TinyClassifier()
    callback = LabelWatch(projection="pca")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], precision="bf16-mixed")).fit(
        model, train, val
    )
    samples = pd.read_parquet(tmp_path / "labelwatch/epoch=1/samples.parquet")
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        batches = [(model(b["x"]), b["target"], b["sample_id"]) for b in val]
    logits, targets, ids = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert logits.dtype == torch.bfloat16
    expected = score_predictions(logits=logits, labels=targets, sample_ids=ids.tolist())
    assert len(samples) == 48
    for column in ("self_confidence", "entropy", "predicted_label", "is_confident_mismatch"):
        assert samples[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)
    assert samples["label_quality"].notna().all()


def test_module_without_validation_outputs_works_through_layer_hooks(tmp_path: Path):
    """validation_step returning None: logits and embeddings come from forward hooks."""
    train, val = loaders()
    callback = LabelWatch(logits_layer="head", embedding_layer="backbone", projection="pca")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], logger=CSVLogger(tmp_path)))
    trainer.fit(TinyClassifier(return_outputs=False), train, val)
    samples = pd.read_parquet(
        tmp_path / "lightning_logs/version_0/labelwatch/epoch=1/samples.parquet"
    )
    assert len(samples) == 48
    assert samples["x"].notna().all()
    assert set(samples["predicted_name"]) <= {"0", "1", "2"}


class _DictHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.linear(x)}


class _FlipAugmented(TinyClassifier):
    """Test-time augmentation: the head runs twice a step, on the input and its negation;
    `unused` never runs and `dict_head` returns a dict, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__(return_outputs=False)
        self.unused = nn.Linear(16, 16)
        self.dict_head = _DictHead()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["x"]
        self.head(self.backbone(x))
        self.head(self.backbone(-x))
        self.dict_head(self.backbone(x))


def test_a_hooked_layer_that_runs_twice_or_not_at_all_is_said(tmp_path: Path):
    """A layer hook keeps the last call of a step: two calls are warned about, a layer that
    never ran (embeddings) is warned about, and a logits layer that returns a dict fails
    in the sanity check, naming the layer."""
    train, val = loaders()
    callback = LabelWatch(logits_layer="head", embedding_layer="unused", projection="none")
    with pytest.warns(UserWarning) as record:
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
            _FlipAugmented(), train, val
        )
    messages = [str(w.message) for w in record if "LabelWatch" in str(w.message)]
    assert sum("`logits_layer`='head' ran 2 times in one validation step" in m for m in messages)
    assert sum("`embedding_layer`='unused' did not run in a validation step" in m for m in messages)
    assert pd.read_parquet(tmp_path / "labelwatch/epoch=0/samples.parquet")["x"].isna().all()
    callback = LabelWatch(logits_layer="dict_head", projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path / "dict", callbacks=[callback], max_epochs=1))
    with pytest.raises(
        ValueError, match="`logits_layer`='dict_head' returned a dict, not a tensor"
    ):
        trainer.fit(_FlipAugmented(), train, val)
    assert trainer.global_step == 0  # the sanity check, before any training


def test_every_n_epochs_also_scores_the_last_epoch_and_never_the_sanity_check(tmp_path: Path):
    """every_n_epochs=2 over 5 epochs scores epochs 1 and 3, and 4, the last (the final
    model); the sanity check's batches are checked but give no epoch."""
    train, val = loaders()
    callback = LabelWatch(every_n_epochs=2, projection="none")
    trainer = Trainer(
        **trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=5, num_sanity_val_steps=2)
    )
    trainer.fit(TinyClassifier(), train, val)
    folders = sorted(p.name for p in (tmp_path / "labelwatch").iterdir())
    assert folders == ["epoch=1", "epoch=3", "epoch=4"]
    assert callback.state_dict() == {
        "last_epoch": 4,
        "last_run": 2,  # the third validation run scored
        "output_root": str(tmp_path / "labelwatch"),
        "output_root_absolute": str(tmp_path / "labelwatch"),
    }


def test_every_n_epochs_scores_the_last_epoch_that_max_steps_sets(tmp_path: Path):
    """max_steps ends the fit in epoch 3 (6 steps an epoch): with every_n_epochs=3 its
    validation is scored as the last one, besides epoch 2, and nothing is warned."""
    train, val = loaders()
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[LabelWatch(every_n_epochs=3, projection="none")],
            max_epochs=-1,
            max_steps=24,
        )
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LabelWatch")
        trainer.fit(TinyClassifier(), train, val)
    assert sorted(p.name for p in (tmp_path / "labelwatch").iterdir()) == ["epoch=2", "epoch=3"]


def test_early_stopping_on_a_skipped_epoch_warns_that_the_final_model_is_unscored(
    tmp_path: Path,
):
    """Early stopping decides after the validation, too late to score it: the end of fit
    says which epoch was skipped and which was scored last."""
    train, val = loaders()
    stop = EarlyStopping("val_loss", patience=1, min_delta=100.0)  # stops after epoch 1
    callback = LabelWatch(every_n_epochs=3, projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback, stop], max_epochs=20))
    with pytest.warns(
        UserWarning,
        match=r"last validation \(epoch 1\) was not scored: every_n_epochs=3 skips it, and no"
        r" later validation came \(early stopping.*the last scored epoch is none",
    ):
        trainer.fit(TinyClassifier(), train, val)
    assert trainer.current_epoch == 2 and not (tmp_path / "labelwatch").exists()


def test_validation_and_scoring_intervals_that_rarely_line_up_are_warned_at_setup(
    tmp_path: Path,
):
    """Validating every 2nd epoch and scoring every 3rd scores only every 6th epoch: said
    before training, and not when one interval divides the other."""
    train, val = loaders(num_val=16)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[LabelWatch(every_n_epochs=3, projection="none")],
            max_epochs=1,
            check_val_every_n_epoch=2,
        )
    )
    with pytest.warns(UserWarning, match=r"so only one validation every 6 epochs is scored"):
        trainer.fit(TinyClassifier(), train, val)
    for every, every_n_epochs in ((2, 4), (4, 2)):
        callback = LabelWatch(every_n_epochs=every_n_epochs, projection="none")
        kwargs = trainer_kwargs(tmp_path, callbacks=[callback], check_val_every_n_epoch=every)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="LabelWatch")
            callback.setup(Trainer(**kwargs), TinyClassifier(), "fit")


def test_an_integer_val_check_interval_of_one_is_warned_as_validating_within_epochs(
    tmp_path: Path,
):
    """val_check_interval=1 (an int: every training batch) is not 1.0 (once an epoch)."""
    train, val = loaders(num_train=32, num_val=16)
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, val_check_interval=1)
    trainer = Trainer(**kwargs, callbacks=[LabelWatch(projection="none")])
    with pytest.warns(UserWarning, match=r"several times per epoch \(val_check_interval=1\)"):
        trainer.fit(TinyClassifier(), train, val)


def test_two_callbacks_watching_different_dataloaders_fit_in_one_trainer(tmp_path: Path):
    """Their state keys differ by the dataloaders they watch; each writes its own folder."""
    train, val = loaders(num_val=16)
    callbacks = [LabelWatch(dataloaders=[i], projection="none") for i in (0, 1)]
    assert callbacks[0].state_key != callbacks[1].state_key
    assert (
        LabelWatch().state_key
        == "LabelWatch{'table_key': 'labelwatch/samples', 'logits_key': 'logits'}"
    )
    Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=1)).fit(
        TinyClassifier(), train, [val, val]
    )
    assert sorted(p.name for p in (tmp_path / "labelwatch").iterdir()) == [
        "dataloader_0",
        "dataloader_1",
    ]


def test_no_embeddings_means_scores_without_a_map(tmp_path: Path):
    """Without embeddings the coordinates are NaN and the summary says no projection."""
    train, val = loaders()
    callback = LabelWatch(logits_layer="head")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(return_outputs=False), train, val
    )
    samples = pd.read_parquet(tmp_path / "labelwatch/epoch=0/samples.parquet")
    assert samples["x"].isna().all()
    assert (
        json.loads((tmp_path / "labelwatch/epoch=0/summary.json").read_text())["projection"]
        == "none"
    )


def test_missing_logits_without_logits_layer_is_a_clear_error(tmp_path: Path):
    """No logits in the outputs and no logits_layer: the error says how to fix it."""
    train, val = loaders()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch()], max_epochs=1))
    with pytest.raises(ValueError, match="found no logits.*returned nothing.*logits_layer"):
        trainer.fit(TinyClassifier(return_outputs=False), train, val)


class _ReturnsTheLogits(TinyClassifier):
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["x"])


def test_logits_returned_bare_are_a_clear_error_that_says_what_came(tmp_path: Path):
    """`return logits` instead of `return {"logits": logits}`: the error says what it got."""
    train, val = loaders()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch()], max_epochs=1))
    with pytest.raises(ValueError, match=r"returned a tensor of shape \(16, 3\), not a dict"):
        trainer.fit(_ReturnsTheLogits(), train, val)


class _IdsBecomeStrings(TinyClassifier):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(BlobDataset(48, seed=2, string_ids=self.current_epoch > 0), batch_size=16)


def test_ids_that_change_kind_between_epochs_start_afresh_with_a_warning(tmp_path: Path):
    """Integer ids in epoch 0, strings from epoch 1: no sample matched, both kinds stayed in
    the history for good, and its file could no longer be written. Now a warning says what
    starts again, and the history is written."""
    train, _ = loaders()
    watch = LabelWatch(projection="pca")
    kwargs = trainer_kwargs(tmp_path, callbacks=[watch], reload_dataloaders_every_n_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Trainer(**kwargs).fit(_IdsBecomeStrings(), train)
    messages = [str(w.message) for w in record]
    assert any("ids changed from integers to str" in m for m in messages)
    assert not any("could not write its epoch history" in m for m in messages)
    samples = pd.read_parquet(tmp_path / "labelwatch/epoch=1/samples.parquet")
    assert samples["sample_id"].str.startswith("clip-").all()
    assert (samples["averaged_epochs"] == 1).all()
    assert (tmp_path / "labelwatch/epoch=1/history.arrow").is_file()


def test_a_fit_that_never_validates_says_nothing_was_scored(tmp_path: Path):
    """limit_val_batches=0 (or no validation loader): one warning at the end of fit, not
    silence and no outputs."""
    train, val = loaders()
    watch = LabelWatch(projection="none")
    kwargs = trainer_kwargs(tmp_path, callbacks=[watch], limit_val_batches=0)
    with pytest.warns(UserWarning, match="LabelWatch scored no validation in this fit"):
        Trainer(**kwargs).fit(TinyClassifier(), train, val)
    assert watch.output_root is None


class CountsTrainingSteps(TinyClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.training_steps = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        return super().training_step(batch, batch_idx)


class LogitsOnly(CountsTrainingSteps):  # no validation loss, which a bad target would break
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"logits": self(batch["x"])}


class MixedIds(LogitsOnly):  # ids of two kinds, as from an object column: 0, "1", 2, ...
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        ids = [i if i % 2 else str(i) for i in batch["sample_id"].tolist()]
        return {**super().validation_step(batch, batch_idx), "sample_id": ids}


class FloatIds(LogitsOnly):  # ids from a float column: 1000.5, 1001.5, ...
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        ids = batch["sample_id"].double() + 0.5
        return {**super().validation_step(batch, batch_idx), "sample_id": ids}


class OneLogit(LogitsOnly):  # a binary head's single logit a sample, squeezed to (N,)
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"logits": self(batch["x"])[:, 0]}


class TupleIds(LogitsOnly):  # (file, chunk) pairs
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        ids = list(zip(batch["path"], batch["sample_id"].tolist(), strict=True))
        return {**super().validation_step(batch, batch_idx), "sample_id": ids}


class TupleIdSamples(BlobDataset):  # (file, chunk) per sample, which collate transposes
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "sample_id": (item["path"], index)}


class NarrowerLater(CountsTrainingSteps):  # as a feature map that flattens to another width
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        out = super().validation_step(batch, batch_idx)
        return {**out, "embeddings": out["embeddings"][:, : 16 - 8 * batch_idx]}


class TargetSeven(BlobDataset):
    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "target": 7 if index == 5 else 0}


class BoxMetadata(BlobDataset):
    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "box": torch.zeros(4)}


class TupleBatches(BlobDataset):
    def __getitem__(self, index: int) -> tuple:
        item = super().__getitem__(index)
        return item["x"], item["target"]


class TupleClassifier(CountsTrainingSteps):
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return super().training_step({"x": batch[0], "target": batch[1]}, batch_idx)

    def validation_step(self, batch: tuple, batch_idx: int) -> dict:
        return {"logits": self(batch[0])}


@pytest.mark.parametrize(
    ("model", "val", "kwargs", "message"),
    [
        (
            lambda: CountsTrainingSteps(return_outputs=False),
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            "found no logits",
        ),
        (
            LogitsOnly,
            lambda: DataLoader(TargetSeven(48), batch_size=16),
            {},
            r"class indices in \[0, 3\) .* found \[7\]",
        ),
        (
            CountsTrainingSteps,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {"class_names": ["dog", "siren"]},
            "`class_names` has 2 names but the model predicts 3 classes",
        ),
        (
            CountsTrainingSteps,
            lambda: DataLoader(BoxMetadata(48), batch_size=16),
            {"metadata_keys": ["box"]},
            r"metadata 'box' to hold one number or string per sample, got shape \(16, 4\)",
        ),
        (
            TupleClassifier,
            lambda: DataLoader(TupleBatches(48), batch_size=16, shuffle=True),
            {},
            r"random order \(RandomSampler\) and its batches carry no sample ids",
        ),
        (
            TupleClassifier,
            lambda: DataLoader(
                TupleBatches(48), batch_size=16, sampler=SubsetRandomSampler(range(8, 40))
            ),
            {},
            r"random order \(SubsetRandomSampler\) and its batches carry no sample ids",
        ),
        (
            TupleClassifier,
            lambda: DataLoader(TupleBatches(48), batch_sampler=RandomBatches(48, 16)),
            {},
            r"random order \(RandomSampler\) and its batches carry no sample ids",
        ),
        (
            MixedIds,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            "`sample_ids` must be of one kind, all integers or all strings",
        ),
        (
            FloatIds,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            r"integers or strings, got a torch.float64 tensor \(first id 1000.5\).*ids.long\(\)",
        ),
        (
            TupleIds,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            r"got the tuple \('audio/0.wav', 1000\); join its parts .*f\"\{file\}#\{chunk\}\"",
        ),
        (
            LogitsOnly,
            lambda: DataLoader(TupleIdSamples(48), batch_size=16),
            {},
            r"got 2 sample ids for 16 samples, each a sequence of 16: per-sample tuple ids",
        ),
        (
            NarrowerLater,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            "embeddings of 8 values per sample in validation batch 1 but 16 in the first",
        ),
        (
            OneLogit,
            lambda: DataLoader(BlobDataset(48), batch_size=16),
            {},
            r"got \(16,\)\. A binary classifier with one logit z a sample: return"
            r" `torch.stack\(\[torch.zeros_like\(z\), z\], 1\)`",
        ),
    ],
    ids=[
        "no-logits",
        "target-out-of-range",
        "class-names",
        "array-metadata",
        "shuffled-no-ids",
        "subset-sampler-no-ids",
        "random-batch-sampler-no-ids",
        "mixed-id-kinds",
        "float-ids",
        "tuple-ids",
        "collated-tuple-ids",
        "embedding-width-changes",
        "one-logit",
    ],
)
def test_capture_mistakes_fail_in_the_sanity_check_before_training(
    tmp_path: Path, model, val, kwargs, message
):
    """Lightning's sanity check runs LabelWatch's capture and scoring checks on its batches,
    so a mistake stops the run before the first training step, not after an epoch."""
    train, _ = loaders()
    module = model()
    callback = LabelWatch(projection="none", **kwargs)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], num_sanity_val_steps=2))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, train, val())
    assert module.training_steps == 0
    assert not (tmp_path / "labelwatch").exists()


class RandomBatches:
    """A custom batch sampler (not a BatchSampler) that holds a random sampler."""

    def __init__(self, size: int, batch_size: int) -> None:
        self.sampler = RandomSampler(range(size))
        self.batch_size = batch_size

    def __iter__(self):
        order = list(self.sampler)
        return iter(order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class Backwards(Sampler):
    """A fixed order that is not the dataset's: positions are not dataset indices."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self):
        return iter(range(self.size - 1, -1, -1))

    def __len__(self) -> int:
        return self.size


def test_positions_from_a_sampler_of_unknown_order_warn(tmp_path: Path):
    """Without ids, a sampler LabelWatch cannot vouch for gets one warning that positions
    stand in for ids; a plain unshuffled loader, or one in order through a
    DistributedSampler (as Lightning adds under DDP), gets none."""
    train = DataLoader(TupleBatches(32), batch_size=16)
    val = DataLoader(TupleBatches(32), batch_size=16, sampler=Backwards(32))
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="none")]))
    with pytest.warns(UserWarning, match="its position, but Backwards may not walk the dataset"):
        trainer.fit(TupleClassifier(), train, val)
    assert (tmp_path / "labelwatch" / "epoch=0" / "samples.parquet").is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LabelWatch")
        trainer = Trainer(
            **trainer_kwargs(tmp_path / "plain", callbacks=[LabelWatch(projection="none")])
        )
        trainer.fit(TupleClassifier(), train, DataLoader(TupleBatches(32), batch_size=16))
        in_order = DistributedSampler(TupleBatches(32), num_replicas=1, rank=0, shuffle=False)
        trainer = Trainer(
            **trainer_kwargs(tmp_path / "distributed", callbacks=[LabelWatch(projection="none")])
        )
        trainer.fit(
            TupleClassifier(), train, DataLoader(TupleBatches(32), batch_size=16, sampler=in_order)
        )


def test_trainer_validate_warns_that_only_fit_is_watched(tmp_path: Path):
    """trainer.validate() is not scored; one warning says so instead of silence."""
    _, val = loaders()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="none")]))
    with pytest.warns(UserWarning, match=r"Trainer.fit only; this trainer.validate\(\) run"):
        trainer.validate(TinyClassifier(), val)
    assert not (tmp_path / "labelwatch").exists()


def test_several_validations_per_epoch_each_count_in_the_history(tmp_path: Path):
    """val_check_interval=0.5 validates twice per epoch: each run is one step of the
    averaging window and the streaks, and the epoch's folder keeps its last run (a warning
    at setup says so)."""
    torch.manual_seed(0)
    train, val = loaders(num_val=60, flip=10)
    callback = LabelWatch(projection="none")
    trainer = Trainer(
        **trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=2, val_check_interval=0.5)
    )
    with pytest.warns(UserWarning, match=r"several times per epoch \(val_check_interval=0.5\)"):
        trainer.fit(TinyClassifier(lr=0.2), train, val)
    out = tmp_path / "labelwatch"
    assert sorted(p.name for p in out.iterdir()) == ["epoch=0", "epoch=1"]
    samples = pd.read_parquet(out / "epoch=1/samples.parquet")
    assert samples["averaged_epochs"].eq(3).all()  # runs 1, 2 and 3 of 0..3
    # Streaks count runs: a streak of 3+ at run 3 continues the one of run 1 (epoch=0) by 2.
    first = pd.read_parquet(out / "epoch=0/samples.parquet").set_index("sample_id")
    streak = samples.set_index("sample_id")["flag_streak"]
    long = streak[streak >= 3]
    assert len(long) and (long == first.loc[long.index, "flag_streak"] + 2).all()
    summary = json.loads((out / "epoch=1/summary.json").read_text())
    assert summary["global_step"] == trainer.global_step  # the epoch's last run
    assert callback.state_dict()["last_run"] == 3


def test_a_second_trainer_warns_again(tmp_path: Path):
    """Warn-once messages are once per fit: the same callback in a new Trainer that still
    validates several times per epoch is told so again."""
    train, val = loaders(num_val=20)
    callback = LabelWatch(projection="none")
    for run in ("first", "second"):
        trainer = Trainer(
            **trainer_kwargs(
                tmp_path / run, callbacks=[callback], max_epochs=1, val_check_interval=0.5
            )
        )
        with pytest.warns(UserWarning, match=r"several times per epoch"):
            trainer.fit(TinyClassifier(), train, val)


def test_unknown_layer_name_fails_in_setup(tmp_path: Path):
    """A logits_layer that is not a submodule is reported with the names that exist."""
    train, val = loaders()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(logits_layer="classifier")]))
    with pytest.raises(ValueError, match=r"`logits_layer`='classifier' is not a submodule.*'head'"):
        trainer.fit(TinyClassifier(), train, val)


def test_duplicate_sample_ids_are_a_clear_error(tmp_path: Path):
    """Two validation samples with one id stop the run with the ids named."""

    class SameIds(BlobDataset):
        def __getitem__(self, index: int) -> dict:
            return {**super().__getitem__(index), "sample_id": index % 40}

    train, _ = loaders()
    val = DataLoader(SameIds(48), batch_size=16)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="none")]))
    with pytest.raises(ValueError, match=r"unique within an epoch; duplicated: \[0, 1, 2"):
        trainer.fit(TinyClassifier(), train, val)


def test_nan_logits_are_left_out_and_warned_once_per_epoch(tmp_path: Path):
    """A model emitting NaN for some samples: those rows are skipped, counted, warned."""

    class NanForSome(TinyClassifier):
        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            out = super().validation_step(batch, batch_idx)
            out["logits"] = torch.where(
                (batch["sample_id"] % 10 == 0)[:, None], torch.nan, out["logits"]
            )
            return out

    train, val = loaders()
    callback = LabelWatch(projection="none")
    with pytest.warns(UserWarning, match="had NaN or infinite logits in epoch 0") as record:
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
            NanForSome(), train, val
        )
    assert sum("NaN or infinite logits in epoch" in str(w.message) for w in record) == 1
    summary = json.loads((tmp_path / "labelwatch/epoch=0/summary.json").read_text())
    assert summary["num_nonfinite"] == 5 and summary["num_samples"] == 43


def test_targets_outside_the_classes_are_a_clear_error(tmp_path: Path):
    """A target of 7 with 3 classes names the bad value and the valid range."""

    class BadTargets(BlobDataset):
        def __getitem__(self, index: int) -> dict:
            return {**super().__getitem__(index), "target": 7 if index == 5 else 0}

    class NoValidationLoss(TinyClassifier):
        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            return {"logits": self(batch["x"])}

    train, _ = loaders()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="none")]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) .* found \[7\]"):
        trainer.fit(NoValidationLoss(), train, DataLoader(BadTargets(48), batch_size=16))


def test_an_epoch_with_nothing_to_score_logs_nothing_and_warns_once(tmp_path: Path):
    """All targets ignored for two epochs: no outputs, a single warning."""

    class Unlabelled(BlobDataset):
        def __getitem__(self, index: int) -> dict:
            return {**super().__getitem__(index), "target": -100}

    class NoValidationLoss(TinyClassifier):
        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            return {"logits": self(batch["x"])}

    train, _ = loaders()
    with pytest.warns(UserWarning, match="no samples to score") as record:
        Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch()])).fit(
            NoValidationLoss(), train, DataLoader(Unlabelled(32), batch_size=16)
        )
    assert sum("no samples to score" in str(w.message) for w in record) == 1
    assert not (tmp_path / "labelwatch").exists()


def test_wandb_failure_warns_once_and_keeps_training_and_local_results(tmp_path: Path, monkeypatch):
    """A failing W&B step (here every epoch's log) never stops training."""
    from labelwatch.sinks.wandb import WandbSink

    def unreachable(*args, **kwargs) -> None:
        raise RuntimeError("media store unreachable")

    monkeypatch.setattr(WandbSink, "log_epoch", unreachable)
    train, val = loaders()
    logger = WandbLogger(project="labelwatch-tests", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback]))
    with pytest.warns(
        UserWarning, match="could not log to W&B .*media store unreachable"
    ) as record:
        trainer.fit(TinyClassifier(), train, val)
    assert sum("could not log to W&B" in str(w.message) for w in record) == 1
    assert trainer.current_epoch == 2
    out = tmp_path / "labelwatch-tests" / logger.experiment.id / "labelwatch"
    assert sorted(p.name for p in out.iterdir()) == ["epoch=0", "epoch=1"]


def test_an_epoch_whose_local_files_fail_still_reaches_wandb_without_an_artifact(
    tmp_path: Path, monkeypatch
):
    """A full disk in epoch 1: a warning, training goes on, W&B still gets that epoch's
    tables (the artifact, which holds the local files, is skipped), and no empty folder is
    left behind."""
    import errno

    from labelwatch.sinks.local import LocalSink

    original = LocalSink.write

    def write(self, epoch, samples, candidates, summary):
        if epoch == 1:
            (self.dirpath / "epoch=1").mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, epoch, samples, candidates, summary)

    monkeypatch.setattr(LocalSink, "write", write)
    train, val = loaders()
    logger = WandbLogger(project="labelwatch-tests", save_dir=str(tmp_path), offline=True)
    callback = LabelWatch(projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[callback], max_epochs=3))
    with pytest.warns(UserWarning) as record:
        trainer.fit(TinyClassifier(), train, val)
    finish_wandb()
    messages = " ".join(str(w.message) for w in record)
    assert "could not write its local outputs" in messages and "No space left" in messages
    assert "epoch 1 could not be written, so W&B gets its tables and metrics" in messages
    assert sorted(p.name for p in callback.output_root.iterdir()) == ["epoch=0", "epoch=2"]
    run_dir = offline_run_dir(tmp_path)
    tables = sorted((run_dir / "files/media/table/labelwatch").glob("samples_*"))
    assert len(tables) == 3
    (log_file,) = run_dir.glob("*.wandb")
    aliases = [
        alias
        for r in wandb_records(log_file)
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "relabel-candidates"
        for alias in r.artifact.aliases
    ]
    assert sorted(a for a in aliases if a.startswith("epoch-")) == ["epoch-0", "epoch-2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1, got 0"),
        ({"every_n_epochs": True}, "`every_n_epochs` must be an integer >= 1, got True"),
        ({"max_points": 0.5}, "`max_points` must be an integer >= 1, got 0.5"),
        ({"projection": "tsne"}, "`projection` must be one of .* got 'tsne'"),
        ({"label_quality": "margin"}, "`label_quality` must be one of .* got 'margin'"),
        ({"max_candidates": -1}, "`max_candidates` must be None or an integer >= 0, got -1"),
        ({"max_candidates": 2.5}, "`max_candidates` must be None or an integer >= 0, got 2.5"),
        ({"candidate_rule": "streak"}, "`candidate_rule` must be one of .* got 'streak'"),
        ({"history_window": 0}, "`history_window` must be an integer >= 1, got 0"),
        ({"history_window": 2.0}, "`history_window` must be an integer >= 1, got 2.0"),
        ({"knn_weight": 1.5}, r"`knn_weight` must be a number in \[0, 1\], got 1.5"),
        ({"min_knn_agreement": -0.1}, r"`min_knn_agreement` must be a number in \[0, 1\]"),
        ({"table_key": "samples"}, "`table_key` must look like 'prefix/name'"),
        ({"embeddings_dtype": "bf16"}, "`embeddings_dtype` must be one of .* got 'bf16'"),
        ({"history_dtype": "float64"}, "`history_dtype` must be one of .* got 'float64'"),
        ({"history_top_k": 0}, "`history_top_k` must be None or an integer >= 1, got 0"),
        ({"logits_dtype": "bf16"}, "`logits_dtype` must be one of .* got 'bf16'"),
        ({"class_names": "abcd"}, r"`class_names` must be a list, e.g. .* got 'abcd'"),
        ({"class_names": ["a", "a", "b"]}, r"`class_names` must be unique .* got \['a'\]"),
        ({"metadata_keys": "path"}, r"`metadata_keys` must be a list, e.g. .*\['path'\]"),
        ({"dataloaders": 0}, r"`dataloaders` must be a list, e.g. dataloaders=\[0\]"),
        ({"max_media_rows": "5"}, "`max_media_rows` must be an integer >= 0, got '5'"),
        ({"ignore_index": "x"}, "`ignore_index` must be an integer, got 'x'"),
        ({"dirpath": 5}, r"`dirpath` must be a path \(str or os.PathLike\), got 5"),
        ({"sample_id_key": 5}, "`sample_id_key` must be a non-empty string, got 5"),
        ({"logits_key": ""}, "`logits_key` must be a non-empty string, got ''"),
        ({"embedding_layer": 5}, "`embedding_layer` must be None or a submodule's name"),
        ({"offload_to_cpu": "yes"}, "`offload_to_cpu` must be True or False, got 'yes'"),
        ({"media_fn": "audio"}, "`media_fn` must be None or a callable row -> W&B media"),
        ({"seed": -1}, "`seed` must be an integer >= 0, got -1"),
        ({"seed": "x"}, "`seed` must be an integer >= 0, got 'x'"),
        ({"seed": 2**32}, r"`seed` must be an integer in \[0, 2\*\*32 - 1\]"),
        ({"min_watch_score": float("inf")}, "`min_watch_score` must be a finite number > 0"),
        ({"table_key": "a/"}, "`table_key` must look like 'prefix/name'"),
        ({"table_key": "/x"}, "`table_key` must look like 'prefix/name'"),
        ({"class_names": ["a", ""]}, r"`class_names` must be non-empty strings, got \[''\]"),
        ({"metadata_keys": ["path", "epoch"]}, r"`metadata_keys` \['epoch'\] would overwrite"),
        ({"metadata_keys": ["watch_siren"]}, r"`metadata_keys` \['watch_siren'\] would over"),
        ({"metadata_keys": ["rank"]}, r"`metadata_keys` \['rank'\] would overwrite"),
    ],
)
def test_bad_arguments_are_rejected_in_init(kwargs, message):
    """Arguments are checked up front, naming the argument and the value received."""
    with pytest.raises(ValueError, match=message):
        LabelWatch(**kwargs)


def test_no_warnings_from_labelwatch_on_a_clean_run(tmp_path: Path):
    """A healthy run raises no LabelWatch warning."""
    train, val = loaders()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Trainer(
            **trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="pca")], max_epochs=1)
        ).fit(TinyClassifier(), train, val)
    assert not [w for w in record if "LabelWatch" in str(w.message)]


def test_knn_agreement_and_flag_streaks_are_logged_per_sample(tmp_path: Path):
    """Each row carries its kNN label agreement and how many epochs in a row it was flagged."""
    train, val = loaders(num_val=60, flip=10)
    callback = LabelWatch(projection="none")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=3)).fit(
        TinyClassifier(lr=0.2), train, val
    )
    epochs = [
        pd.read_parquet(tmp_path / f"labelwatch/epoch={e}/samples.parquet").set_index("sample_id")
        for e in range(3)
    ]
    last = epochs[-1]
    assert last["knn_agreement"].between(0, 1).all()
    # the flipped labels sit inside another class's blob: their neighbours disagree
    flipped = last.index < 1010
    assert (
        last.loc[flipped, "knn_agreement"].mean() < 0.5 < last.loc[~flipped, "knn_agreement"].mean()
    )
    expected = pd.Series(0, index=last.index)
    for frame in epochs:
        expected = (expected + 1).where(frame["is_confident_mismatch"], 0)
        pd.testing.assert_series_equal(frame["flag_streak"], expected, check_names=False)
    assert last["flag_streak"].max() >= 2


def test_flag_streaks_skip_samples_missing_from_an_epoch():
    """A sample absent from an epoch keeps its streak and continues it when it returns."""
    callback = LabelWatch(projection="none")

    def epoch(flags: dict[str, bool]) -> list[int]:
        frame = pd.DataFrame(
            {"sample_id": list(flags), "is_confident_mismatch": list(flags.values())}
        )
        return callback._scorer(None)._flag_streaks(frame).tolist()

    assert epoch({"a": True, "b": True, "c": False}) == [1, 1, 0]
    assert epoch({"a": True, "c": True}) == [2, 1]  # b missing
    assert epoch({"b": True, "c": True, "d": True}) == [2, 2, 1]  # b back: 1 + 1
    assert epoch({"a": False, "d": True}) == [0, 2]


def test_first_watch_scores_are_each_samples_first_and_survive_an_absence():
    """A sample keeps the watch score of the first epoch it was scored in: one first seen
    later gets that epoch's, and one missing from an epoch keeps its own for its return."""
    scorer = LabelWatch(projection="none", watch_classes=["1"])._scorer(None)

    def epoch(scores: dict[str, float]) -> list[float]:
        frame = pd.DataFrame({"sample_id": list(scores), "watch_1": list(scores.values())})
        return scorer._first_watch_scores(frame, ["1"])[:, 0].tolist()

    assert epoch({"a": 4.0, "b": 1.0}) == [4.0, 1.0]
    assert epoch({"a": 0.5, "c": 3.5}) == [4.0, 3.5]  # c is new; b missing
    assert epoch({"b": 9.0, "c": 0.0, "d": float("nan")})[:2] == [1.0, 3.5]  # b back
    assert math.isnan(epoch({"d": 2.0})[0])  # d's first validation gave no score


def test_wandb_logging_runs_beside_training_and_is_complete_when_fit_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Epoch 0's W&B logging blocks until training has reached epoch 1: it can only finish
    if it runs off the training thread. Every epoch is logged, in order, by fit's end."""
    import threading

    from lightning.pytorch import Callback

    from labelwatch.sinks.wandb import WandbSink

    training_moved_on = threading.Event()
    logged = []
    real_log_epoch = WandbSink.log_epoch

    def slow_log_epoch(self, **kwargs):
        waited = training_moved_on.wait(timeout=60) if kwargs["epoch"] == 0 else True
        logged.append((kwargs["epoch"], threading.current_thread().name, waited))
        real_log_epoch(self, **kwargs)

    class SignalEpochOne(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                training_moved_on.set()

    monkeypatch.setattr(WandbSink, "log_epoch", slow_log_epoch)
    train, val = loaders()
    logger = WandbLogger(project="labelwatch-tests", save_dir=str(tmp_path), offline=True)
    callbacks = [LabelWatch(projection="none"), SignalEpochOne()]
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks))
    trainer.fit(TinyClassifier(), train, val)
    assert [epoch for epoch, _, _ in logged] == [0, 1]
    assert all(name.startswith("labelwatch-logging") and waited for _, name, waited in logged)


class _FailsInEpochOne(TinyClassifier):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1:
            raise RuntimeError("out of memory, say")
        return super().training_step(batch, batch_idx)


class _KeepsSlabs(Callback):
    """Weak references to the capture memory LabelWatch keeps between epochs."""

    def __init__(self, watch: LabelWatch) -> None:
        self.watch, self.refs = watch, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for slabs in self.watch._spare_slabs.values():
            self.refs += [weakref.ref(t) for t in slabs.values()]


def test_a_failed_fit_frees_the_capture_memory_and_unhooks_the_model(tmp_path: Path):
    """Lightning skips teardown after an exception; the callback still releases what it
    holds (on the GPU in real use) and removes its forward hooks, so a retry starts clean."""
    train, val = loaders()
    watch = LabelWatch(projection="none", logits_layer="head", embedding_layer="backbone")
    keeps = _KeepsSlabs(watch)
    model = _FailsInEpochOne()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[watch, keeps], max_epochs=3))
    with pytest.raises(RuntimeError, match="out of memory, say"):
        trainer.fit(model, train, val)
    gc.collect()
    assert keeps.refs and all(ref() is None for ref in keeps.refs)
    assert not model.head._forward_hooks and not model.backbone._forward_hooks
    assert (tmp_path / "labelwatch/epoch=0/samples.parquet").is_file()


def test_cleanup_after_a_failed_fit_goes_on_when_one_step_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """After the fit's error, logging what is outstanding fails too: the worker process is
    still stopped (each cleanup step runs on its own), and the fit's own error comes out."""
    import multiprocessing

    def fails(self, wait: bool, give_up: bool = False) -> None:
        if give_up:
            raise OSError("disk full, say")

    monkeypatch.setattr(LabelWatch, "_finish_maps", fails)
    train, val = loaders()
    watch = LabelWatch(map_in_background=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_epochs=3))
    with pytest.raises(RuntimeError, match="out of memory, say"):
        with pytest.warns(UserWarning, match="could not finish its outputs.*disk full, say"):
            trainer.fit(_FailsInEpochOne(), train, val)
    assert not multiprocessing.active_children()


def test_a_retry_after_an_error_inside_an_epoch_end_fits_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An error between scoring and the end of epoch 1's epoch end (a Ctrl-C, say) left the
    scorer one validation run ahead of the callback, and fitting again on the same Trainer,
    as a notebook retries, raised. The retry reads the state back from epoch 0's files."""
    import labelwatch.callback as callback_module

    select = callback_module.select_candidates
    calls = []

    def fails_in_epoch_one(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("interrupted, say")
        return select(*args, **kwargs)

    monkeypatch.setattr(callback_module, "select_candidates", fails_in_epoch_one)
    train, val = loaders()
    watch = LabelWatch(projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_epochs=3))
    with pytest.raises(RuntimeError, match="interrupted, say"):
        trainer.fit(TinyClassifier(), train, val)
    trainer.fit(trainer.lightning_module, train, val)
    samples = pd.read_parquet(watch.last_output_dir / "samples.parquet")
    assert samples["epoch"].unique().tolist() == [2]
    assert (samples["averaged_epochs"] == 3).all()  # epoch 0's history, then the retry's


def _collate_keeping_lists(items: list[dict]) -> dict:
    """Default collate, except for metadata, kept as lists of whatever the samples hold."""
    from torch.utils.data import default_collate

    batch = default_collate([{k: item[k] for k in ("x", "target", "sample_id")} for item in items])
    for key in ("path", "source"):
        batch[key] = [item[key] for item in items]
    return batch


class _OddMetadata(BlobDataset):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["path"] = Path(item["path"])
        item["source"] = index if index % 2 else f"unknown-{index}"
        return item


def test_metadata_parquet_cannot_store_is_written_as_text(tmp_path: Path):
    """Paths, and a column mixing numbers and strings, failed the parquet file at the first
    epoch end and killed the fit: paths become strings, a mixed column text, with a
    warning."""
    train, _ = loaders()
    val = DataLoader(_OddMetadata(20), batch_size=8, collate_fn=_collate_keeping_lists)
    watch = LabelWatch(projection="none", metadata_keys=["path", "source"])
    with pytest.warns(UserWarning, match="metadata 'source' holds values of several kinds"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[watch])).fit(TinyClassifier(), train, val)
    samples = pd.read_parquet(watch.last_output_dir / "samples.parquet").sort_values("sample_id")
    assert samples["path"].tolist() == [f"audio/{i}.wav" for i in range(20)]
    assert samples["source"].tolist() == [str(i) if i % 2 else f"unknown-{i}" for i in range(20)]


def test_a_remote_trainer_folder_writes_the_outputs_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Trainer folder that is a URL (s3://, here fsspec's memory://) killed the fit at the
    first epoch end (pyarrow took the collapsed path for a URI); a relative folder with a
    colon (lr:0.1) too. The outputs go to a local folder, with a warning for the URL."""
    monkeypatch.chdir(tmp_path)
    train, val = loaders()
    remote = LabelWatch(projection="none")
    with pytest.warns(UserWarning, match="memory://bucket/run is remote"):
        Trainer(**trainer_kwargs("memory://bucket/run", callbacks=[remote])).fit(
            TinyClassifier(), train, val
        )
    assert remote.last_output_dir == Path("labelwatch/epoch=1")
    assert (tmp_path / "labelwatch/epoch=1/samples.parquet").is_file()
    colon = LabelWatch(projection="none")
    Trainer(**trainer_kwargs("lr:0.1", callbacks=[colon])).fit(TinyClassifier(), train, val)
    assert (tmp_path / "lr:0.1/labelwatch/epoch=1/samples.parquet").is_file()
    with pytest.raises(ValueError, match="`dirpath` must be a local folder"):
        LabelWatch(dirpath="s3://bucket/labelwatch")


def test_outputs_get_the_permissions_of_the_umask(tmp_path: Path):
    """Every output file is readable as the umask allows (0644 under 022), not private to
    its owner as a bare mkstemp file would be: colleagues on a shared machine read them."""
    import os
    import stat

    train, val = loaders()
    previous = os.umask(0o022)
    try:
        Trainer(**trainer_kwargs(tmp_path, callbacks=[LabelWatch(projection="none")])).fit(
            TinyClassifier(), train, val
        )
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "labelwatch").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"samples.parquet", "summary.json", "history.arrow"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
