"""LabelWatch's defaults in real Trainer runs: window-averaged probabilities, the combined
`label_quality` (knn_mixed_margin) and the candidate rule (confident learning on p_mix, or
few agreeing neighbours)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, Subset

from labelwatch import LabelWatch
from labelwatch.combined import combined_quality, mix_probabilities
from labelwatch.history import EpochHistory
from labelwatch.neighbours import knn_label_distribution
from labelwatch.scoring import compute_scores
from tests.helpers import BlobDataset, TinyClassifier, loaders, trainer_kwargs

FLIPPED = 10  # the first FLIPPED validation samples (ids 1000..1009) carry a wrong label


class ProbabilityRecorder(Callback):
    """Each validation epoch's softmax per sample id, from a forward pass of its own: a
    reference for the averages LabelWatch computes."""

    def __init__(self) -> None:
        self.epochs: list[dict[int, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs.append({})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if trainer.sanity_checking:  # LabelWatch does not score these batches
            return
        with torch.no_grad():
            probs = torch.softmax(pl_module(batch["x"]), dim=1)
        self.epochs[-1].update(zip(batch["sample_id"].tolist(), probs, strict=True))

    def averaged(self, ids: list[int], window: int) -> torch.Tensor:
        """``(N, C)`` mean of the last ``window`` epochs' probabilities of ``ids``."""
        last = self.epochs[-window:]
        return torch.stack([torch.stack([e[i] for i in ids]) for e in last]).mean(dim=0)


def _fit(
    tmp_path: Path, max_epochs: int = 3, model: TinyClassifier | None = None, **arguments
) -> tuple[TinyClassifier, LabelWatch, ProbabilityRecorder]:
    torch.manual_seed(0)
    train, val = loaders(num_val=60, flip=FLIPPED)
    model = model or TinyClassifier(lr=0.2)
    callback, recorder = LabelWatch(projection="none", **arguments), ProbabilityRecorder()
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback, recorder], max_epochs=max_epochs)).fit(
        model, train, val
    )
    return model, callback, recorder


def _read(tmp_path: Path, epoch: int, name: str = "samples") -> pd.DataFrame:
    return pd.read_parquet(tmp_path / f"labelwatch/epoch={epoch}/{name}.parquet")


def test_averaged_self_confidence_is_the_mean_over_the_last_window_epochs(tmp_path: Path):
    """With history_window=2, each epoch's averaged p(given) is the mean of its last 2 epochs."""
    _fit(tmp_path, max_epochs=4, history_window=2)
    epochs = [_read(tmp_path, e).set_index("sample_id") for e in range(4)]
    pd.testing.assert_series_equal(
        epochs[0]["averaged_self_confidence"], epochs[0]["self_confidence"], check_names=False
    )
    for before, now in zip(epochs[:-1], epochs[1:], strict=True):
        expected = (before["self_confidence"] + now["self_confidence"]) / 2
        np.testing.assert_allclose(now["averaged_self_confidence"], expected, rtol=1e-5)
        assert now["averaged_epochs"].eq(2).all()
    assert epochs[0]["averaged_epochs"].eq(1).all()
    # the history for a resume sits beside the newest epoch only
    assert [p.parent.name for p in (tmp_path / "labelwatch").glob("*/history.arrow")] == ["epoch=3"]


def test_history_is_saved_off_the_training_thread(tmp_path: Path, monkeypatch):
    """Each epoch's history file is written on the history thread; the next epoch's update
    waits for it (each save sees its own epoch), and fit ends with the last one on disk."""
    import threading

    saves = []
    original = EpochHistory.save

    def slow_save(self, path):
        time.sleep(0.5)  # still writing when the next epoch's scores are computed
        saves.append((threading.current_thread().name, self.last_epoch))
        return original(self, path)

    monkeypatch.setattr(EpochHistory, "save", slow_save)
    _fit(tmp_path, max_epochs=3)
    assert [epoch for _, epoch in saves] == [0, 1, 2]
    assert all(thread.startswith("labelwatch-history") for thread, _ in saves)
    history = EpochHistory.load(tmp_path / "labelwatch/epoch=2/history.arrow")
    assert history.last_epoch == 2 and history.window == 3


def test_a_failed_history_save_warns_and_training_goes_on(tmp_path: Path, monkeypatch):
    """Any error while saving the history is a warning; the samples are all written."""

    def broken_save(self, path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(EpochHistory, "save", broken_save)
    with pytest.warns(UserWarning, match="could not write its epoch history.*disk on fire"):
        _fit(tmp_path, max_epochs=2)
    assert len(_read(tmp_path, 1)) == 60
    assert not list((tmp_path / "labelwatch").glob("*/history.arrow"))


def test_float16_history_keeps_the_scores_and_candidates(tmp_path: Path):
    """history_dtype="float16" stores the window in half precision: the scores move by
    less than 1e-3 and the candidates stay the same as with float32."""
    results = {}
    for dtype in ("float32", "float16"):
        _fit(tmp_path / dtype, history_dtype=dtype)
        history = EpochHistory.load(tmp_path / dtype / "labelwatch/epoch=2/history.arrow")
        results[dtype] = (_read(tmp_path / dtype, 2), history)
    (full, full_history), (half, half_history) = results["float32"], results["float16"]
    assert (full_history.dtype, half_history.dtype) == (torch.float32, torch.float16)
    for column in ("label_quality", "averaged_self_confidence"):
        np.testing.assert_allclose(half[column], full[column], atol=1e-3)
    assert half.loc[half["is_candidate"], "sample_id"].tolist() == (
        full.loc[full["is_candidate"], "sample_id"].tolist()
    )


def test_a_top_k_history_of_c_minus_one_classes_changes_nothing(tmp_path: Path):
    """history_top_k=2 of 3 classes keeps each past vector's top 2 probabilities and gives
    the rest to the third class: the same vectors, so the same scores and candidates as
    whole vectors (history_top_k=None), through the real Trainer path."""
    results = {}
    for top_k in (None, 2):
        _fit(tmp_path / str(top_k), history_top_k=top_k)
        history = EpochHistory.load(tmp_path / str(top_k) / "labelwatch/epoch=2/history.arrow")
        results[top_k] = (_read(tmp_path / str(top_k), 2), history)
    (whole, whole_history), (top, top_history) = results[None], results[2]
    assert (whole_history.keeps_top_k, top_history.keeps_top_k) == (False, True)
    for column in ("label_quality", "averaged_self_confidence"):
        np.testing.assert_allclose(top[column], whole[column], atol=1e-6)
    assert top.loc[top["is_candidate"], "sample_id"].tolist() == (
        whole.loc[whole["is_candidate"], "sample_id"].tolist()
    )


def test_float16_capture_keeps_the_scores_and_candidates(tmp_path: Path):
    """logits_dtype and embeddings_dtype "float16" (the memory-saving options): the scores
    move by less than 2e-3 and the candidates stay the same as in float32."""
    _fit(tmp_path / "full")
    _fit(tmp_path / "half", logits_dtype="float16", embeddings_dtype="float16")
    full, half = _read(tmp_path / "full", 2), _read(tmp_path / "half", 2)
    for column in ("self_confidence", "label_quality", "averaged_self_confidence", "entropy"):
        np.testing.assert_allclose(half[column], full[column], atol=2e-3)
        assert not np.array_equal(half[column], full[column])  # float16 was really used
    assert half.loc[half["is_candidate"], "sample_id"].tolist() == (
        full.loc[full["is_candidate"], "sample_id"].tolist()
    )


def test_default_label_quality_is_knn_mixed_margin_of_the_averaged_probabilities(
    tmp_path: Path,
):
    """label_quality = (p_mix(given) - max p_mix(other) + 1) / 2 with p_mix = 0.7 x the
    3-epoch average + 0.3 x the neighbours' labels, recomputed here from the saved history
    and the final model's embeddings; flipped labels rank first."""
    model, callback, recorder = _fit(tmp_path)
    assert (callback.label_quality, callback.history_window, callback.knn_weight) == (
        "knn_mixed_margin",
        3,
        0.3,
    )
    samples = _read(tmp_path, 2)
    ids = samples["sample_id"].tolist()
    labels = torch.tensor(samples["given_label"].to_numpy())
    averaged = recorder.averaged(ids, window=3)
    val = BlobDataset(60, seed=2, flip=FLIPPED)
    with torch.no_grad():
        embeddings = model.backbone(val.x[[i - 1000 for i in ids]])
    knn = knn_label_distribution(embeddings, labels, 3, k=10)
    expected = combined_quality(averaged, labels, knn, method="knn_mixed_margin", knn_weight=0.3)
    np.testing.assert_allclose(samples["label_quality"], expected.double(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        samples["knn_agreement"], knn.gather(1, labels[:, None]).squeeze(1), atol=1e-6
    )
    assert samples["averaged_epochs"].eq(3).all()
    flipped = samples["sample_id"] < 1000 + FLIPPED
    assert (
        samples.loc[flipped, "label_quality"].max() < samples.loc[~flipped, "label_quality"].min()
    )
    summary = json.loads((tmp_path / "labelwatch/epoch=2/summary.json").read_text())
    assert (summary["label_quality"], summary["candidate_rule"]) == ("knn_mixed_margin", "combined")

    # the candidate rule, recomputed: confident learning on p_mix, or knn agreement < 0.2
    mixed = compute_scores(mix_probabilities(averaged, knn, knn_weight=0.3), labels)
    np.testing.assert_array_equal(
        samples["is_mixed_confident_mismatch"], mixed.is_confident_mismatch.numpy()
    )
    expected_flags = mixed.is_confident_mismatch.numpy() | (samples["knn_agreement"] < 0.2)
    np.testing.assert_array_equal(samples["is_candidate"], expected_flags)


def test_candidates_are_the_flagged_rows_ranked_and_capped(tmp_path: Path):
    """Candidates: is_candidate rows, lowest label_quality first, at most max_candidates,
    each suggesting a class other than its given one; the single-epoch confident-mismatch
    flag keeps its own meaning beside them."""
    _fit(tmp_path, max_candidates=6)
    samples, candidates = _read(tmp_path, 2), _read(tmp_path, 2, "candidates")
    flagged = samples[samples["is_candidate"]].sort_values("label_quality", kind="stable")
    assert len(flagged) > 6  # the cap is what limits the list
    assert candidates["sample_id"].tolist() == flagged["sample_id"].head(6).tolist()
    assert candidates["rank"].tolist() == list(range(1, 7))
    assert (candidates["suggested_label"] != candidates["given_label"]).all()
    assert (candidates["sample_id"] < 1000 + FLIPPED).all()  # all six are real errors
    for column in ("knn_agreement", "averaged_self_confidence", "is_mixed_confident_mismatch"):
        assert column in candidates.columns
    summary = json.loads((tmp_path / "labelwatch/epoch=2/summary.json").read_text())
    assert (summary["num_flagged"], summary["num_candidates"]) == (len(flagged), 6)


def test_old_rule_and_single_epoch_ranking_stay_selectable(tmp_path: Path):
    """candidate_rule='confident_mismatch' with label_quality='self_confidence' gives the
    single-epoch behaviour: candidates are the is_confident_mismatch rows ranked by p(given)."""
    _fit(tmp_path, candidate_rule="confident_mismatch", label_quality="self_confidence")
    samples, candidates = _read(tmp_path, 2), _read(tmp_path, 2, "candidates")
    pd.testing.assert_series_equal(
        samples["label_quality"], samples["self_confidence"], check_names=False
    )
    pd.testing.assert_series_equal(
        samples["is_candidate"], samples["is_confident_mismatch"], check_names=False
    )
    expected = samples[samples["is_confident_mismatch"]].sort_values("label_quality", kind="stable")
    assert len(expected) > 0
    assert candidates["sample_id"].tolist() == expected["sample_id"].tolist()
    pd.testing.assert_series_equal(
        candidates["suggested_label"],
        expected["suggested_label"].reset_index(drop=True),
        check_names=False,
    )


def test_without_embeddings_the_default_uses_the_averaged_probabilities(tmp_path: Path):
    """No embeddings: no neighbours, so label_quality is the averaged margin and candidates
    are confident learning on the averaged probabilities (no warning: it is documented)."""
    model = TinyClassifier(lr=0.2, return_outputs=False)
    *_, recorder = _fit(tmp_path, max_epochs=2, model=model, logits_layer="head")
    samples = _read(tmp_path, 1)
    ids = samples["sample_id"].tolist()
    labels = torch.tensor(samples["given_label"].to_numpy())
    averaged = recorder.averaged(ids, window=3)
    expected = combined_quality(averaged, labels, method="averaged_margin")
    np.testing.assert_allclose(samples["label_quality"], expected.double(), rtol=1e-5, atol=1e-6)
    assert samples["knn_agreement"].isna().all()
    pd.testing.assert_series_equal(
        samples["is_candidate"], samples["is_mixed_confident_mismatch"], check_names=False
    )
    summary = json.loads((tmp_path / "labelwatch/epoch=1/summary.json").read_text())
    assert summary["label_quality"] == "averaged_margin"


def test_above_the_cpu_cap_there_are_no_neighbours(tmp_path: Path, monkeypatch):
    """Embeddings on a CPU and more samples than KNN_MAX_SAMPLES: knn_agreement is NaN and
    the default ranking falls back to the averaged margin, as without embeddings."""
    monkeypatch.setattr("labelwatch.epoch_scoring.KNN_MAX_SAMPLES", 59)
    _fit(tmp_path, max_epochs=1)
    samples = _read(tmp_path, 0)
    assert len(samples) == 60 and samples["knn_agreement"].isna().all()
    summary = json.loads((tmp_path / "labelwatch/epoch=0/summary.json").read_text())
    assert summary["label_quality"] == "averaged_margin"


@pytest.mark.parametrize("label_quality", ["averaged_self_confidence", "normalized_margin"])
def test_other_label_quality_methods_fill_the_column(tmp_path: Path, label_quality: str):
    """A named method is what label_quality holds: here the averaged or single-epoch score."""
    _fit(tmp_path, max_epochs=2, label_quality=label_quality)
    samples = _read(tmp_path, 1)
    if label_quality == "averaged_self_confidence":
        expected = samples["averaged_self_confidence"]
    else:
        expected = (samples["margin"] + 1) / 2
    np.testing.assert_allclose(samples["label_quality"], expected, rtol=1e-5, atol=1e-6)


def test_a_second_trainer_with_the_same_callback_starts_afresh_in_its_own_folder(
    tmp_path: Path,
):
    """Reusing one LabelWatch with a new Trainer (a notebook cell run again, a second
    stage): its outputs go to the new Trainer's folder, the first fit's files are left as
    they were, and the average and streaks start again, without a warning."""
    first, second = tmp_path / "first", tmp_path / "second"
    model, callback, _ = _fit(first, max_epochs=2)
    before = {p: p.read_bytes() for p in (first / "labelwatch").rglob("*") if p.is_file()}
    train, val = loaders(num_val=60, flip=FLIPPED)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LabelWatch")
        Trainer(**trainer_kwargs(second, callbacks=[callback], max_epochs=1)).fit(model, train, val)
    assert {p: p.read_bytes() for p in (first / "labelwatch").rglob("*") if p.is_file()} == before
    samples = _read(second, 0)
    assert samples["averaged_epochs"].eq(1).all()
    assert samples["flag_streak"].le(1).all()
    assert callback.state_dict() == {
        "last_epoch": 0,
        "last_run": 0,
        "output_root": str(second / "labelwatch"),
        "output_root_absolute": str(second / "labelwatch"),
    }


def test_a_class_too_small_to_fill_a_neighbourhood_is_not_flagged_for_it(tmp_path: Path):
    """Two validation samples of class 2: at most 1 of 10 neighbours can share their label,
    so kNN agreement alone would flag them however right they are. The neighbourhood
    clause asks only what the class can reach; flipped labels in big classes still count."""
    blobs = BlobDataset(60, seed=2, flip=6)
    rare = [8, 11]  # class 2, labelled right
    keep = [i for i in range(60) if blobs.labels[i] != 2] + rare
    train, _ = loaders()
    val = DataLoader(Subset(blobs, keep), batch_size=16)
    torch.manual_seed(0)
    callback = LabelWatch(projection="none", embedding_layer="backbone")
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=3)).fit(
        TinyClassifier(lr=0.2), train, val
    )
    samples = pd.read_parquet(callback.last_output_dir / "samples.parquet").set_index("sample_id")
    rare_rows = samples.loc[[1000 + i for i in rare]]
    assert (rare_rows["predicted_label"] == 2).all() and (rare_rows["knn_agreement"] < 0.2).all()
    assert not rare_rows["is_candidate"].any()
    flipped = samples.loc[[1000 + i for i in (0, 2, 3, 5)]]
    assert flipped["is_candidate"].sum() >= 3


def test_a_class_absent_from_validation_has_a_null_threshold(tmp_path: Path):
    """No validation sample labelled 2: its confident-learning threshold is undefined and
    summary.json says null rather than the internal never-reached sentinel."""
    blobs = BlobDataset(48, seed=2)
    train, _ = loaders()
    val = DataLoader(Subset(blobs, [i for i in range(48) if blobs.labels[i] != 2]), batch_size=16)
    callback = LabelWatch(projection="none", class_names=["a", "b", "c"])
    Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
        TinyClassifier(), train, val
    )
    thresholds = json.loads((callback.last_output_dir / "summary.json").read_text())["thresholds"]
    assert thresholds["c"] is None
    assert 0 < thresholds["a"] <= 1 and 0 < thresholds["b"] <= 1


class OneDimensionalEmbeddings(TinyClassifier):
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {**super().validation_step(batch, batch_idx), "embeddings": batch["x"][:, :1]}


def test_one_dimensional_embeddings_give_no_neighbours_and_say_why(tmp_path: Path):
    """Cosine similarity in one dimension is +1 or -1: neighbours would be arbitrary, so
    knn_agreement is NaN and one warning says why, rather than flags from noise."""
    train, val = loaders()
    callback = LabelWatch(projection="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1))
    with pytest.warns(UserWarning, match="the embeddings have one dimension"):
        trainer.fit(OneDimensionalEmbeddings(), train, val)
    samples = pd.read_parquet(callback.last_output_dir / "samples.parquet")
    assert samples["knn_agreement"].isna().all()


def test_a_large_epoch_on_a_cpu_uses_the_approximate_search_and_a_capped_one_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Above EXACT_KNN_POINTS on a CPU the neighbours come from the approximate search
    (exact below ann's own threshold, so the columns equal the exact search's here); above
    KNN_MAX_SAMPLES there are none, and one warning says what falls back."""
    import labelwatch.epoch_scoring as module

    def fit(out: Path) -> pd.DataFrame:
        torch.manual_seed(0)
        train, val = loaders(num_val=60, flip=FLIPPED)
        callback = LabelWatch(projection="none")
        Trainer(**trainer_kwargs(out, callbacks=[callback], max_epochs=1)).fit(
            TinyClassifier(lr=0.2), train, val
        )
        return pd.read_parquet(callback.last_output_dir / "samples.parquet")

    exact = fit(tmp_path / "exact")
    calls = []
    approximate = module.approximate_neighbours
    monkeypatch.setattr(module, "EXACT_KNN_POINTS", 20)
    monkeypatch.setattr(
        module, "approximate_neighbours", lambda *a, **k: calls.append(1) or approximate(*a, **k)
    )
    searched = fit(tmp_path / "approximate")
    assert calls and searched["knn_agreement"].notna().all()
    pd.testing.assert_frame_equal(searched, exact)
    monkeypatch.setattr(module, "KNN_MAX_SAMPLES", 50)
    with pytest.warns(UserWarning, match="60 samples with embeddings on a CPU; the neighbourhood"):
        capped = fit(tmp_path / "capped")
    assert capped["knn_agreement"].isna().all()


class EmbeddingsWithoutDirection(TinyClassifier):
    """Finite logits, but some embeddings with no direction: every 12th all zero (a dead
    layer), others with a NaN or with 1e5, which float16 stores as inf. Keeps the last
    epoch's embeddings by sample id."""

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        out = super().validation_step(batch, batch_idx)
        ids, embeddings = batch["sample_id"], out["embeddings"].clone()
        embeddings[ids % 12 == 0] = 0.0
        embeddings[ids % 12 == 5, 0] = torch.nan
        embeddings[ids % 12 == 7, 1] = 1e5
        if batch_idx == 0:
            self.embeddings = {}
        self.embeddings.update(zip(ids.tolist(), embeddings.detach(), strict=True))
        return {**out, "embeddings": embeddings}


@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_rows_whose_embeddings_have_no_direction_keep_their_logit_scores_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search: str
):
    """NaN, float16-overflowed and all-zero embeddings no longer stop the fit or borrow
    arbitrary neighbours: those rows have NaN knn_agreement, watch scores and map
    coordinates, p_mix from their averaged probabilities alone, are counted in
    summary.json and warned about once per epoch; the other rows' neighbours are searched
    among themselves, on the exact or the approximate search."""
    import labelwatch.epoch_scoring as module
    from labelwatch.neighbours import approximate_neighbours, knn_neighbours

    if search == "approximate":
        monkeypatch.setattr(module, "EXACT_KNN_POINTS", 20)
    torch.manual_seed(0)
    train, val = loaders(num_val=60, flip=FLIPPED)
    model, recorder = EmbeddingsWithoutDirection(lr=0.2), ProbabilityRecorder()
    callback = LabelWatch(
        class_names=["a", "b", "c"],
        watch_classes=["c"],
        embeddings_dtype="float16",
        projection="pca",
        map_in_background=False,
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback, recorder]))
    with pytest.warns(UserWarning, match="no neighbours") as record:
        trainer.fit(model, train, val)
    warned = [str(w.message) for w in record if "no neighbours" in str(w.message)]
    assert len(warned) == 2 and "epoch 1, 10 had NaN or infinite embeddings" in warned[1]
    assert "`embeddings_dtype`='float16' overflows above 65504" in warned[1]
    assert "and 5 had all-zero embeddings" in warned[1]

    samples = _read(tmp_path, 1)
    bad = (samples["sample_id"] % 12).isin([0, 5, 7]).to_numpy()
    assert bad.sum() == 15 and len(samples) == 60
    without = samples[bad]
    for column in ("knn_agreement", "watch_c", "x", "y", "moved"):
        assert without[column].isna().all(), column
    assert samples.loc[~bad, ["knn_agreement", "x", "y"]].notna().all().all()
    assert samples.loc[~bad & (samples["given_name"] != "c"), "watch_c"].notna().all()
    assert without["self_confidence"].notna().all()
    summary = json.loads((tmp_path / "labelwatch/epoch=1/summary.json").read_text())
    assert (summary["num_nonfinite_embeddings"], summary["num_zero_embeddings"]) == (10, 5)
    assert summary["map_points"] == 45

    # p_mix of a row without neighbours is its averaged probabilities
    ids = samples["sample_id"].tolist()
    labels = torch.tensor(samples["given_label"].to_numpy())
    averaged = recorder.averaged(ids, window=2)[torch.from_numpy(bad)]
    expected = combined_quality(averaged, labels[bad], method="averaged_margin")
    np.testing.assert_allclose(without["label_quality"], expected.double(), rtol=1e-5, atol=1e-6)
    # the others' neighbours: searched among the others alone, as stored (float16)
    kept = torch.stack([model.embeddings[i] for i in samples.loc[~bad, "sample_id"]]).half()
    find = approximate_neighbours if search == "approximate" else knn_neighbours
    neighbours = find(kept, k=10)
    agreement = (labels[~bad][neighbours] == labels[~bad][:, None]).float().mean(dim=1)
    np.testing.assert_allclose(samples.loc[~bad, "knn_agreement"], agreement.double(), atol=1e-7)


def test_all_zero_embeddings_are_no_candidates_for_the_samples_that_come_first(tmp_path: Path):
    """A sure and right model on a validation set sorted by class, with every fourth
    embedding all zero: those rows used to take the first ten samples (all of class 0)
    as neighbours, so kNN agreement flagged the other classes' zero rows."""

    class SureAndRight(TinyClassifier):
        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            embeddings = batch["x"].clone()
            embeddings[batch["sample_id"] % 4 == 0] = 0.0
            logits = 10.0 * torch.nn.functional.one_hot(batch["target"], 3).float()
            return {"logits": logits, "embeddings": embeddings}

    blobs = BlobDataset(60, seed=2)
    by_class = sorted(range(60), key=lambda i: (int(blobs.labels[i]), i))
    train, _ = loaders()
    val = DataLoader(Subset(blobs, by_class), batch_size=16)
    callback = LabelWatch(projection="none")
    with pytest.warns(UserWarning, match="15 had all-zero embeddings"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1)).fit(
            SureAndRight(), train, val
        )
    samples = _read(tmp_path, 0)
    zero = samples["sample_id"] % 4 == 0
    assert samples.loc[zero, "knn_agreement"].isna().all()
    assert samples.loc[~zero, "knn_agreement"].ge(0.8).all()
    assert not samples["is_candidate"].any()
