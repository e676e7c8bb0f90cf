"""Epoch history (averaged probabilities, flag streaks, save/load) and combined scores."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.feather as feather
import pytest
import torch

from labelwatch.combined import (
    COMBINED_METHODS,
    HistoryScores,
    candidate_flags,
    combined_quality,
    history_scores,
    limit_candidates,
    mix_probabilities,
    mixed_thresholds,
    reachable_agreement,
)
from labelwatch.history import EpochHistory
from labelwatch.scoring import compute_scores


def _probs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_averages_over_the_window_only():
    """The average covers the last `window` epochs of each sample, not older ones."""
    history = EpochHistory(window=2)
    no_flags = torch.zeros(1, dtype=torch.bool)
    history.update(0, ["a"], _probs([1.0, 0.0]), no_flags)
    averaged, _ = history.update(1, ["a"], _probs([0.0, 1.0]), no_flags)
    assert averaged.tolist() == [[0.5, 0.5]]
    averaged, _ = history.update(2, ["a"], _probs([0.0, 1.0]), no_flags)
    assert averaged.tolist() == [[0.0, 1.0]]


def test_aligns_by_id_when_order_changes():
    """Ids arriving in another order are matched by id, and the output follows the new order."""
    history = EpochHistory(window=3)
    flags = torch.zeros(2, dtype=torch.bool)
    history.update(0, [10, 20], _probs([1.0, 0.0], [0.0, 1.0]), flags)
    averaged, _ = history.update(1, [20, 10], _probs([0.5, 0.5], [0.5, 0.5]), flags)
    assert averaged.tolist() == [[0.25, 0.75], [0.75, 0.25]]


def test_streak_counts_consecutive_flags_and_resets():
    """The streak grows while a sample stays flagged and drops to 0 when it is not."""
    history = EpochHistory(window=2)
    probs = _probs([0.5, 0.5], [0.5, 0.5])
    streaks = [
        history.update(epoch, ["a", "b"], probs, torch.tensor(flags))[1].tolist()
        for epoch, flags in enumerate([[True, False], [True, True], [False, True], [True, True]])
    ]
    assert streaks == [[1, 0], [2, 1], [0, 2], [1, 3]]


def test_missing_ids_are_skipped_not_reset():
    """A sample absent from an epoch keeps its window and streak; new ids start fresh."""
    history = EpochHistory(window=2)
    history.update(0, ["a"], _probs([1.0, 0.0]), torch.tensor([True]))
    history.update(1, ["b"], _probs([0.0, 1.0]), torch.tensor([True]))
    averaged, streak = history.update(
        2, ["a", "b"], _probs([0.0, 1.0], [0.0, 1.0]), torch.ones(2, dtype=torch.bool)
    )
    assert averaged.tolist() == [[0.5, 0.5], [0.0, 1.0]]
    assert streak.tolist() == [2, 2]


@pytest.mark.parametrize(("dtype", "top_k"), [(torch.float16, None), (torch.float32, 2)])
def test_save_load_round_trip_continues_like_the_original(tmp_path, dtype, top_k):
    """After save/load (the resume case) the next update gives the same result."""
    generator = torch.Generator().manual_seed(0)
    ids = ["x", "y", "z"]
    original = EpochHistory(window=3, dtype=dtype, top_k=top_k)
    for epoch in range(4):
        probs = torch.softmax(torch.randn(3, 4, generator=generator), dim=1)
        original.update(epoch, ids, probs, torch.rand(3, generator=generator) > 0.5)
    path = original.save(tmp_path / "epoch=3" / "history.arrow")
    with warnings.catch_warnings():  # e.g. torch's about read-only arrays: none
        warnings.simplefilter("error")
        restored = EpochHistory.load(path)
    assert (restored.window, restored.dtype, restored.last_epoch) == (3, dtype, 3)
    assert (restored.top_k, restored.keeps_top_k) == (top_k, top_k is not None)
    probs = torch.softmax(torch.randn(3, 4, generator=generator), dim=1)
    flags = torch.tensor([True, False, True])
    expected = original.update(4, ids[::-1], probs, flags)
    got = restored.update(4, ids[::-1], probs, flags)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary


def _top_k_and_the_rest(row: torch.Tensor, k: int | None) -> torch.Tensor:
    """What a past vector becomes with `top_k`: its k largest values kept, the rest of the
    probability spread evenly over the other classes."""
    if k is None or k >= len(row):
        return row
    kept = torch.zeros_like(row, dtype=torch.bool)
    kept[row.topk(k).indices] = True
    return torch.where(kept, row, (1 - row[kept].sum()) / (len(row) - k))


@pytest.mark.parametrize("top_k", [None, 2, 5])
def test_matches_a_per_id_reference_as_ids_come_and_go(tmp_path, top_k):
    """Random subsets of ids in random orders (and, once, all ids in row order) average the
    same as a plain per-id list of the last `window` vectors, before and after a save/load;
    with `top_k` the past vectors keep their top classes and the rest spread evenly (C = 5:
    top_k=5 keeps whole vectors)."""
    generator = torch.Generator().manual_seed(1)
    history, reference = EpochHistory(window=3, top_k=top_k), {}
    every_id = [f"s{i}" for i in range(12)]
    for epoch in range(8):
        if epoch == 5:  # every id known, in row order: the fast path without a gather
            ids = history._ids.tolist()
        else:
            keep = torch.randperm(12, generator=generator)[: 4 + epoch]
            ids = [every_id[i] for i in keep.tolist()]
        probs = torch.softmax(torch.randn(len(ids), 5, generator=generator), dim=1)
        averaged, _ = history.update(epoch, ids, probs, torch.zeros(len(ids), dtype=torch.bool))
        past = [reference.get(sample_id, [])[-2:] for sample_id in ids]
        rows = zip(past, probs, strict=True)
        expected = torch.stack([torch.stack([*p, row]).mean(0) for p, row in rows])
        torch.testing.assert_close(averaged, expected)
        for sample_id, row in zip(ids, probs, strict=True):
            stored = _top_k_and_the_rest(row, top_k)
            reference[sample_id] = [*reference.get(sample_id, []), stored][-2:]
        if epoch == 3:
            history = EpochHistory.load(history.save(tmp_path / "history.arrow"))


def test_logits_are_stored_as_their_softmax(monkeypatch):
    """from_logits=True stores exactly what passing the softmax would, chunk by chunk, with
    ids in row order or not."""
    monkeypatch.setattr("labelwatch.history._CHUNK_VALUES", 12)  # 3 rows of 4 classes
    generator = torch.Generator().manual_seed(0)
    from_probs, from_logits = EpochHistory(window=2), EpochHistory(window=2)
    ids = list(range(10))
    for epoch, order in enumerate([ids, ids, ids[::-1] + [10, 11]]):
        logits = torch.randn(len(order), 4, generator=generator)
        flags = torch.zeros(len(order), dtype=torch.bool)
        expected, _ = from_probs.update(epoch, order, torch.softmax(logits, dim=1), flags)
        averaged, _ = from_logits.update(epoch, order, logits, flags, from_logits=True)
        assert torch.equal(averaged, expected)


def test_to_changes_the_storage_dtype_and_keeps_the_window():
    """A history read back in float32 and switched to float16 (a resumed run that asks for
    half precision) keeps averaging the same window."""
    history = EpochHistory(window=2)
    no_flags = torch.zeros(1, dtype=torch.bool)
    history.update(0, ["a"], _probs([0.25, 0.75]), no_flags)
    assert history.to(torch.float16) is history and history.dtype == torch.float16
    averaged, _ = history.update(1, ["a"], _probs([0.75, 0.25]), no_flags)
    assert averaged.tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        history.to(torch.int8)


def test_load_rejects_a_file_that_is_not_a_history(tmp_path):
    path = tmp_path / "history.arrow"
    path.write_bytes(b"PAR1 not an arrow file")
    with pytest.raises(ValueError, match="not a labelwatch history file"):
        EpochHistory.load(path)


def test_update_rejects_inconsistent_input():
    """Duplicate ids, a changed class count and a non-increasing epoch are refused."""
    history = EpochHistory()
    with pytest.raises(ValueError, match=r"`sample_ids` must be unique"):
        history.update(0, [1, 1], _probs([1.0, 0.0], [1.0, 0.0]), torch.zeros(2, dtype=torch.bool))
    history.update(0, [1], _probs([1.0, 0.0]), torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`probs` has 3 classes but the history holds 2"):
        history.update(1, [1], _probs([1.0, 0.0, 0.0]), torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`epoch` must increase"):
        history.update(0, [1], _probs([1.0, 0.0]), torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`window` must be an integer >= 1, got 0"):
        EpochHistory(window=0)


@pytest.mark.parametrize("method", COMBINED_METHODS)
def test_combined_scores_in_unit_interval_lower_for_wrong_labels(method):
    """Every combined score is in [0, 1] and lower for a label the model and neighbours reject."""
    probs = _probs([0.9, 0.05, 0.05], [0.9, 0.05, 0.05])
    knn = _probs([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    quality = combined_quality(probs, torch.tensor([0, 1]), knn, method=method)
    assert torch.all((quality >= 0) & (quality <= 1))
    assert quality[1] < quality[0]


@pytest.mark.parametrize("top_k", [None, 2])
def test_chunked_steps_equal_one_update(monkeypatch, top_k):
    """begin/average a chunk of rows at a time gives update's averages; mean_at gives those
    averages at one column per row exactly, and refuses once the past is overwritten."""
    monkeypatch.setattr("labelwatch.history._CHUNK_VALUES", 12)  # 3 rows of 4 classes
    generator = torch.Generator().manual_seed(2)
    whole, chunked = EpochHistory(window=3, top_k=top_k), EpochHistory(window=3, top_k=top_k)
    ids = list(range(10))
    for epoch, order in enumerate([ids, ids[::-1], ids, ids[3:] + [10, 11]]):
        probs = torch.softmax(torch.randn(len(order), 4, generator=generator), dim=1)
        flags = torch.rand(len(order), generator=generator) < 0.5
        columns = torch.randint(0, 4, (len(order),), generator=generator)
        expected, streak = whole.update(epoch, order, probs, flags)
        step = chunked.begin(epoch, order, flags, 4)
        at_columns = step.mean_at(columns, probs.gather(1, columns[:, None]).squeeze(1))
        assert torch.equal(at_columns, expected.gather(1, columns[:, None]).squeeze(1))
        rows = step.chunks()
        assert len(rows) == -(-len(order) // 3)
        averaged = torch.cat([step.average(r, probs[r].clone()) for r in rows])
        assert torch.equal(averaged, expected) and torch.equal(step.streak, streak)
        with pytest.raises(RuntimeError, match="before average"):
            step.mean_at(columns, probs[:, 0])


def test_window_one_keeps_no_vectors(tmp_path):
    """window=1 averages the current epoch alone and stores no past vectors."""
    history = EpochHistory(window=1)
    probs = _probs([0.2, 0.8], [0.6, 0.4])
    for epoch in range(2):
        averaged, _ = history.update(epoch, ["a", "b"], probs, torch.zeros(2, dtype=torch.bool))
        assert torch.equal(averaged, probs)
        probs = probs.flip(1)
    restored = EpochHistory.load(history.save(tmp_path / "history.arrow"))
    assert restored.filled(["a", "b"]).tolist() == [1, 1] and restored.num_classes == 2
    names = feather.read_table(tmp_path / "history.arrow").column_names
    assert not [name for name in names if name.startswith("probs_")]


@pytest.mark.parametrize("with_neighbours", [True, False])
def test_history_scores_of_chunks_equal_one_call(with_neighbours):
    """Chunks of rows scored with mixed_thresholds (computed from the given-label column
    alone) give exactly the scores of one history_scores call on every row."""
    generator = torch.Generator().manual_seed(3)
    averaged = torch.softmax(3 * torch.randn(400, 6, generator=generator), dim=1)
    labels = torch.randint(0, 6, (400,), generator=generator)
    knn, agreement = None, None
    if with_neighbours:
        votes = torch.randint(0, 6, (400, 10), generator=generator)
        knn = torch.nn.functional.one_hot(votes, 6).float().mean(dim=1)
        agreement = knn.gather(1, labels[:, None]).squeeze(1)
    whole = history_scores(averaged, labels, knn)
    given = averaged.gather(1, labels[:, None]).squeeze(1)
    thresholds = mixed_thresholds(given, labels, 6, agreement)
    parts = [
        history_scores(
            averaged[r],
            labels[r],
            knn[r] if knn is not None else None,
            thresholds=thresholds,
        )
        for r in (slice(0, 150), slice(150, 151), slice(151, 400))
    ]
    chunked = HistoryScores.concat(parts)
    assert chunked.method == whole.method
    for name in (
        "quality",
        "averaged_self_confidence",
        "is_mixed_confident_mismatch",
        "is_candidate",
        "suggested",
    ):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert whole.is_mixed_confident_mismatch.any()  # the thresholds matter here


@pytest.mark.parametrize("with_neighbours", [True, False])
@pytest.mark.parametrize("method", COMBINED_METHODS)
def test_history_scores_equal_the_standalone_functions(method, with_neighbours):
    """history_scores reuses one pass over p_mix for quality and suggestion: the results
    are exactly those of combined_quality and of a plain argmax over the other classes."""
    generator = torch.Generator().manual_seed(0)
    averaged = torch.softmax(3 * torch.randn(500, 7, generator=generator), dim=1)
    averaged[:50] = averaged[50:100]  # repeated rows give ties in the neighbours' mix
    labels = torch.randint(0, 7, (500,), generator=generator)
    knn = None
    if with_neighbours:
        votes = torch.randint(0, 7, (500, 10), generator=generator)
        knn = torch.nn.functional.one_hot(votes, 7).float().mean(dim=1)
    scores = history_scores(averaged, labels, knn, method=method)
    written = averaged.clone()
    again = history_scores(written, labels, knn, method=method, writable=True)
    assert torch.equal(written, averaged) and torch.equal(again.quality, scores.quality)
    if knn is None and method.startswith("knn"):
        method = "averaged_self_confidence" if "self_confidence" in method else "averaged_margin"
    assert scores.method == method
    assert torch.equal(scores.quality, combined_quality(averaged, labels, knn, method=method))
    mixed = averaged if knn is None else mix_probabilities(averaged, knn)
    best_other = mixed.scatter(1, labels[:, None], -torch.inf).argmax(dim=1)
    flagged = compute_scores(mixed, labels)
    expected = torch.where(flagged.is_confident_mismatch, flagged.suggested, best_other)
    assert torch.equal(scores.suggested, expected)
    assert torch.equal(scores.is_mixed_confident_mismatch, flagged.is_confident_mismatch)


@pytest.mark.parametrize("method", COMBINED_METHODS)
def test_a_row_of_nan_neighbours_is_scored_as_without_embeddings(method):
    """A sample without neighbours (a row of NaN in knn_distribution) has p_mix = its
    averaged probabilities, the kNN clause off and a knn method's stand-in as quality; the
    other rows' p_mix keeps its neighbours, and chunks still equal one call."""
    generator = torch.Generator().manual_seed(5)
    averaged = torch.softmax(3 * torch.randn(300, 5, generator=generator), dim=1)
    labels = torch.randint(0, 5, (300,), generator=generator)
    votes = torch.randint(0, 5, (300, 10), generator=generator)
    knn = torch.nn.functional.one_hot(votes, 5).float().mean(dim=1)
    knn[:30] = torch.nan
    alone = torch.arange(300) < 30
    scores = history_scores(averaged, labels, knn, method=method)
    mixed = mix_probabilities(averaged, knn)
    assert torch.equal(mixed[:30], averaged[:30])
    assert torch.equal(mixed[30:], mix_probabilities(averaged[30:], knn[30:]))
    flagged = compute_scores(mixed, labels)
    agreement = knn.gather(1, labels[:, None]).squeeze(1)
    disagree = ~alone & (agreement < 0.2)
    assert torch.equal(scores.is_candidate, flagged.is_confident_mismatch | disagree)
    assert not scores.is_candidate[:30].all()  # NaN does not count as no agreement
    stand_in = {"knn_agreement": "averaged_margin"}.get(method, method)
    stand_in = stand_in.replace("knn_mixed", "averaged")
    expected = combined_quality(averaged[alone], labels[alone], method=stand_in)
    torch.testing.assert_close(scores.quality[alone], expected, rtol=0, atol=1e-6)
    if method != "knn_agreement":  # it has no NaN, so the rest is the plain formula
        assert torch.equal(scores.quality, combined_quality(averaged, labels, knn, method=method))
    given = averaged.gather(1, labels[:, None]).squeeze(1)
    thresholds = mixed_thresholds(given, labels, 5, agreement)
    assert torch.equal(thresholds, compute_scores(mixed, labels).thresholds)
    parts = [
        history_scores(averaged[r], labels[r], knn[r], method=method, thresholds=thresholds)
        for r in (slice(0, 20), slice(20, 300))
    ]
    assert torch.equal(HistoryScores.concat(parts).is_candidate, scores.is_candidate)


def test_compute_scores_without_entropy():
    """with_entropy=False leaves the entropy out and changes nothing else (the method that
    needs it is refused); writable=True gives the same scores and leaves the input as it was."""
    probs = torch.softmax(torch.randn(300, 5, generator=torch.Generator().manual_seed(1)), 1)
    labels = torch.arange(300) % 5
    full, lean = compute_scores(probs, labels), compute_scores(probs, labels, with_entropy=False)
    assert lean.entropy is None and full.entropy is not None
    for field in ("predicted", "self_confidence", "margin", "best_other", "suggested"):
        assert torch.equal(getattr(full, field), getattr(lean, field))
    copy = probs.clone()
    written = compute_scores(copy, labels, writable=True)  # may write to `copy`, restores it
    assert torch.equal(copy, probs)
    for field in ("predicted", "self_confidence", "margin", "entropy", "suggested"):
        assert torch.equal(getattr(full, field), getattr(written, field))
    with pytest.raises(ValueError, match="with_entropy"):
        compute_scores(
            probs, labels, with_entropy=False, label_quality="confidence_weighted_entropy"
        )


def test_combined_quality_needs_the_neighbours_for_knn_methods():
    """A knn_* method without knn_distribution says what to pass."""
    with pytest.raises(ValueError, match=r"needs `knn_distribution`"):
        combined_quality(_probs([0.5, 0.5]), torch.tensor([0]), method="knn_mixed_margin")


def test_candidate_rule_and_budget():
    """Few agreeing neighbours flag a sample; the budget keeps the lowest-quality flags."""
    probs = _probs([0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4])
    labels = torch.tensor([0, 0, 0, 1])
    knn = _probs([1.0, 0.0], [0.1, 0.9], [1.0, 0.0], [1.0, 0.0])
    flags = candidate_flags(probs, labels, knn)
    assert flags.tolist() == [False, True, False, True]
    quality = combined_quality(probs, labels, knn)
    assert limit_candidates(flags, quality, 1).tolist() == [False, False, False, True]
    assert limit_candidates(flags, quality, None).tolist() == flags.tolist()


def test_reachable_agreement_is_what_each_class_can_fill():
    """A class of n samples fills at most n - 1 of k neighbours; a lone sample none."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert reachable_agreement(labels, 2).tolist() == [1.0, 1.0, 1.0, 0.5, 0.5, 0.0]
    assert reachable_agreement(labels, 0).tolist() == [0.0] * 6


def test_a_per_sample_minimum_agreement_spares_what_its_class_cannot_reach():
    """With the minimum scaled by reachable_agreement, the one agreeing neighbour a pair
    can give is enough; the same agreement in a big class still flags."""
    probs = _probs(*[[0.9, 0.1]] * 4, [0.1, 0.9], [0.1, 0.9])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    knn = _probs(*[[1.0, 0.0]] * 3, [0.75, 0.25], [0.75, 0.25], [0.75, 0.25])
    flags_at_half = candidate_flags(probs, labels, knn, min_knn_agreement=0.5)
    assert flags_at_half.tolist() == [False, False, False, False, True, True]
    minimum = 0.5 * reachable_agreement(labels, 4)  # class 1 reaches 1/4: minimum 0.125
    flags = candidate_flags(probs, labels, knn, min_knn_agreement=minimum)
    assert flags.tolist() == [False] * 6
    with pytest.raises(ValueError, match="a number in"):
        candidate_flags(probs, labels, knn, min_knn_agreement=torch.full((6,), 1.5))
    with pytest.raises(ValueError, match=r"shape \(6,\) with values in \[0, 1\]; got shape"):
        candidate_flags(probs, labels, knn, min_knn_agreement=torch.full((5,), 0.1))
    scalar = candidate_flags(probs, labels, knn, min_knn_agreement=torch.tensor(0.5))
    assert scalar.tolist() == flags_at_half.tolist()


def test_numpy_input_is_named_as_not_a_tensor():
    """A numpy array where a tensor is needed says so, rather than 'must be a tensor of
    shape (2,), got shape (2,)'."""
    history = EpochHistory(window=2)
    with pytest.raises(ValueError, match=r"got a numpy.ndarray of shape \(2,\) \(not a tensor"):
        history.update(0, [1, 2], torch.rand(2, 3), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match=r"got a numpy.ndarray of shape \(2, 3\) \(not a tensor"):
        history_scores(np.full((2, 3), 1 / 3), torch.tensor([0, 1]))


def test_top_k_stores_the_top_classes_and_the_rest_per_class():
    """With top_k=2 of C=4 a past vector keeps its 2 largest probabilities and spreads the
    other 0.2 over the 2 other classes; the past takes k values + k classes + 1 rest a row."""
    history = EpochHistory(window=2, top_k=2)
    no_flags = torch.zeros(1, dtype=torch.bool)
    history.update(0, ["a"], _probs([0.5, 0.05, 0.3, 0.15]), no_flags)
    assert history.keeps_top_k and tuple(history._past.shape) == (1, 1, 2)
    averaged, _ = history.update(1, ["a"], _probs([0.0, 0.0, 0.0, 1.0]), no_flags)
    torch.testing.assert_close(averaged, _probs([0.25, 0.05, 0.15, 0.55]))


def test_a_top_k_of_at_least_c_keeps_whole_vectors():
    generator = torch.Generator().manual_seed(4)
    exact, wide = EpochHistory(window=3), EpochHistory(window=3, top_k=6)
    for epoch in range(4):
        probs = torch.softmax(torch.randn(5, 6, generator=generator), dim=1)
        flags = torch.zeros(5, dtype=torch.bool)
        assert torch.equal(
            wide.update(epoch, range(5), probs, flags)[0],
            exact.update(epoch, range(5), probs, flags)[0],
        )
    assert not wide.keeps_top_k


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True, "32"])
def test_a_bad_top_k_is_refused(top_k):
    with pytest.raises(ValueError, match="`top_k` must be None or an integer >= 1"):
        EpochHistory(top_k=top_k)


def test_stores_like_tells_which_top_k_keeps_vectors_the_same_way():
    """A resume reuses a saved history only when `history_top_k` would store it alike: any
    top_k >= C keeps whole vectors, as None does."""
    no_flags = torch.zeros(1, dtype=torch.bool)
    whole, top = EpochHistory(), EpochHistory(top_k=2)
    assert whole.stores_like(2)  # C is not known yet: nothing stored
    for history in (whole, top):
        history.update(0, ["a"], _probs([0.4, 0.3, 0.2, 0.1]), no_flags)
    assert whole.stores_like(None) and whole.stores_like(4) and whole.stores_like(32)
    assert not whole.stores_like(2) and top.stores_like(2)
    assert not top.stores_like(None) and not top.stores_like(3)
