"""Scores against hand-computed values and against cleanlab as an oracle."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from labelwatch import score_predictions
from labelwatch.scoring import LABEL_QUALITY_METHODS, SAMPLE_COLUMNS


def _random_probs(rng: np.random.Generator, n: int, c: int, rounded: bool) -> np.ndarray:
    logits = rng.normal(size=(n, c)) * rng.uniform(0.2, 5)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if rounded:  # coarse values create exact ties between classes and with thresholds
        probs = np.round(probs, 1) + 1e-3
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def test_columns_follow_the_schema():
    """The frame has the documented columns in order and one row per sample."""
    frame = score_predictions(logits=torch.randn(5, 3), labels=[0, 1, 2, 0, 1], epoch=4)
    assert tuple(frame.columns) == SAMPLE_COLUMNS
    assert len(frame) == 5
    assert (frame["epoch"] == 4).all()
    assert frame["sample_id"].tolist() == [0, 1, 2, 3, 4]


def test_uniform_probabilities_have_entropy_one_and_one_hot_zero():
    """Entropy is normalised by log(C): uniform gives 1, one-hot gives 0."""
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0]])
    frame = score_predictions(probs=probs, labels=[0, 0])
    assert frame["entropy"].tolist() == pytest.approx([1.0, 0.0], abs=1e-12)


def test_margin_self_confidence_and_confidence_by_hand():
    """p = (0.6, 0.3, 0.1): hand-computed margins for a right and a wrong label."""
    probs = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    frame = score_predictions(probs=probs, labels=[0, 2], class_names=["a", "b", "c"])
    assert frame["self_confidence"].tolist() == pytest.approx([0.6, 0.1])
    assert frame["margin"].tolist() == pytest.approx([0.3, -0.5])
    assert frame["confidence"].tolist() == pytest.approx([0.6, 0.6])
    assert frame["predicted_name"].tolist() == ["a", "a"]
    assert frame["is_mismatch"].tolist() == [False, True]
    expected_entropy = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert frame["entropy"].iloc[0] == pytest.approx(expected_entropy / math.log(3))


def test_logits_are_softmaxed_in_float32_whatever_their_precision():
    """bf16 logits give float32-accurate probabilities of the bf16 values."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.bfloat16)
    frame = score_predictions(logits=logits, labels=[0, 0])
    expected = torch.softmax(logits.float(), dim=1)[:, 0].tolist()
    assert frame["self_confidence"].tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", LABEL_QUALITY_METHODS)
def test_label_quality_methods_equal_cleanlab(method: str):
    """Each label_quality method equals cleanlab.rank's score of the same name."""
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 200, 5, rounded=False)
    labels = rng.integers(0, 5, size=200)
    frame = score_predictions(probs=probs, labels=labels, label_quality=method)
    expected = get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=False)
    np.testing.assert_allclose(frame["label_quality"], expected, rtol=1e-9, atol=1e-12)
    assert frame["label_quality"].between(0, 1).all()


@pytest.mark.parametrize("method", LABEL_QUALITY_METHODS)
def test_label_quality_from_confident_logits_equals_cleanlab(method: str):
    """From float32 logits as confident as a trained model's (p(given) down to 1e-30), each
    method equals cleanlab's on the float64 softmax. confidence_weighted_entropy divides the
    entropy by p(given), so it needs the entropy of a confident row far below float32's
    rounding error (it read 0, and the score 0 where cleanlab's is near 1)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 10)) * rng.uniform(0.5, 30, size=(2000, 1))
    logits = torch.from_numpy(logits).float()
    labels = rng.integers(0, 10, size=2000)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    assert (probs[np.arange(2000), labels] < 1e-6).sum() > 100  # the rows that differed
    frame = score_predictions(logits=logits, labels=labels, label_quality=method)
    expected = get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=False)
    np.testing.assert_allclose(frame["label_quality"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_confident_mismatch_equals_cleanlab_on_random_inputs(seed: int, dtype: type):
    """is_confident_mismatch selects exactly cleanlab's confident_learning issues."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(10, 400)), int(rng.integers(2, 12))
    probs = _random_probs(rng, n, c, rounded=seed % 2 == 0).astype(dtype)
    labels = rng.integers(0, c, size=n)
    labels[:c] = np.arange(c)  # cleanlab needs at least two classes present
    if seed % 4 == 1:  # a class nobody is labelled with
        labels[labels == c - 1] = 0
    frame = score_predictions(probs=probs, labels=labels)
    expected = find_label_issues(labels, probs, filter_by="confident_learning")
    np.testing.assert_array_equal(frame["is_confident_mismatch"].to_numpy(), expected)


@pytest.mark.parametrize(
    ("probs", "labels"),
    [
        # exact ties between the given class and another class
        ([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6]], [0, 1, 2, 0]),
        # a probability exactly at its class threshold, and just below tolerance
        ([[0.7, 0.3], [0.3, 0.7], [0.7 - 1e-6, 0.3 + 1e-6], [0.3, 0.7]], [0, 1, 1, 0]),
        # several confident classes: the argmax decides
        ([[0.45, 0.45, 0.1], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]], [2, 0, 1, 2]),
        # all samples labelled 0 (the one single-class case cleanlab accepts)
        ([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 0, 0]),
        # given label within cleanlab's 1e-6 of the top prediction
        ([[0.4999995, 0.5000005], [0.1, 0.9], [0.9, 0.1]], [0, 1, 0]),
    ],
)
def test_confident_mismatch_equals_cleanlab_on_crafted_cases(probs, labels):
    """Ties, near-threshold values and single-class labels agree with cleanlab."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    frame = score_predictions(probs=probs, labels=labels)
    expected = find_label_issues(labels, probs, filter_by="confident_learning")
    np.testing.assert_array_equal(frame["is_confident_mismatch"].to_numpy(), expected)


def test_suggested_label_is_the_confident_class():
    """A confident mismatch suggests the class that passed its threshold."""
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.95, 0.05]])
    frame = score_predictions(probs=probs, labels=[0, 0, 1, 1], class_names=["dog", "siren"])
    flagged = frame[frame["is_confident_mismatch"]]
    assert flagged["sample_id"].tolist() == [3]
    assert flagged["suggested_name"].tolist() == ["dog"]


def test_ignore_index_rows_are_skipped_and_counted():
    """Targets equal to ignore_index are left out and counted in attrs."""
    frame = score_predictions(
        logits=torch.randn(4, 3), labels=[0, -100, 2, -100], sample_ids=["a", "b", "c", "d"]
    )
    assert frame["sample_id"].tolist() == ["a", "c"]
    assert frame.attrs["num_ignored"] == 2


def test_nonfinite_logits_are_skipped_counted_and_warned():
    """NaN or inf logits drop their rows with one RuntimeWarning."""
    logits = torch.randn(4, 3)
    logits[1, 0] = float("nan")
    logits[2, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 of 4 samples have NaN or infinite logits"):
        frame = score_predictions(logits=logits, labels=[0, 1, 2, 0])
    assert frame["sample_id"].tolist() == [0, 3]
    assert frame.attrs["num_nonfinite"] == 2


def test_float64_logits_beyond_float32s_range_are_skipped_like_infinite_ones():
    """Scoring runs in float32: a float64 logit of 1e39 would be infinite there, its row
    NaN and its class's threshold NaN."""
    logits = torch.randn(4, 3, dtype=torch.float64)
    logits[1, 0] = 1e39
    with pytest.warns(RuntimeWarning, match="1 of 4 samples have NaN or infinite logits"):
        frame = score_predictions(logits=logits, labels=[0, 1, 2, 1])
    assert frame["sample_id"].tolist() == [0, 2, 3]
    assert frame["label_quality"].notna().all()
    assert not np.isnan(np.asarray(frame.attrs["thresholds"], dtype=float)).any()


def test_bfloat16_probabilities_are_scored_as_float32():
    """numpy has no bfloat16: the probabilities are upcast, as bfloat16 logits are."""
    probs = torch.softmax(torch.randn(6, 3), dim=1)
    labels = [0, 1, 2, 0, 1, 2]
    frame = score_predictions(probs=probs.bfloat16(), labels=labels)
    expected = score_predictions(probs=probs.bfloat16().float(), labels=labels)
    pd.testing.assert_frame_equal(frame, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"logits": torch.randn(2, 3, 4), "labels": [0, 1]},
            r"must be 2-D .* got shape \(2, 3, 4\)",
        ),
        (
            {"logits": torch.randn(2), "labels": [0, 1]},
            r"got shape \(2,\)\. A binary classifier with one logit z a sample: pass"
            r" `torch.stack\(\[torch.zeros_like\(z\), z\], 1\)`",
        ),
        ({"logits": torch.randn(3, 3), "labels": [0, 1]}, "has 3 rows but `labels` has 2"),
        (
            {"logits": torch.randn(2, 3), "labels": [0, 3]},
            r"class indices in \[0, 3\) .* found \[3\]",
        ),
        ({"logits": torch.randn(2, 3), "labels": [0, -1]}, r"found \[-1\]"),
        ({"logits": torch.randn(2, 3), "labels": [0, 1], "class_names": ["a"]}, "has 1 names"),
        ({"logits": torch.randn(2, 3), "labels": [0, 1], "sample_ids": [7, 7]}, r"unique .* \[7\]"),
        ({"logits": torch.randn(2, 3), "labels": [0, 1], "sample_ids": [7]}, "has 1 entries"),
        (
            {"probs": torch.tensor([[2.0, -1.0], [0.3, 0.4]]), "labels": [0, 1]},
            r"`probs` must be probabilities.* values in \[-1, 2\] and row sums in \[0.7, 1\]",
        ),
        (
            {"logits": torch.randn(2, 3), "labels": [0, 1], "class_names": "abc"},
            "`class_names` must be a list of names, got the string 'abc'",
        ),
        (
            {"logits": torch.randn(2, 3), "labels": [0, 1], "sample_ids": [1, "1"]},
            r"of one kind, all integers or all strings, say; got int \(e.g. 1\), str \(e.g.",
        ),
        (
            {"logits": torch.randn(2, 3), "labels": [0, 1], "sample_ids": [1, 1.5]},
            r"of one kind.*got int \(e.g. 1\), float \(e.g. 1.5\)",
        ),
        (
            {"logits": torch.randn(2, 1), "labels": [0, 0]},
            r"at least 2 classes \(columns\), got 1. A binary classifier with one logit z",
        ),
        ({"logits": torch.randn(2, 3), "probs": torch.rand(2, 3), "labels": [0, 1]}, "exactly one"),
        ({"logits": torch.randn(2, 3), "labels": [0.0, 1.0]}, "integer class indices"),
        ({"logits": torch.randn(2, 3), "labels": [0, 1], "label_quality": "x"}, "must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, message):
    """Each malformed input names the problem and the fix."""
    with pytest.raises(ValueError, match=message):
        score_predictions(**kwargs)


def test_the_binary_fix_in_the_error_scores_sigmoid_probabilities():
    """A single logit z, padded as the error says, scores p(1) = sigmoid(z)."""
    z = torch.tensor([[-2.0], [0.5], [3.0]])
    samples = score_predictions(logits=torch.cat([torch.zeros_like(z), z], 1), labels=[1, 1, 0])
    expected = torch.sigmoid(z[:, 0]).double().numpy()
    np.testing.assert_allclose(
        samples["self_confidence"], [*expected[:2], 1 - expected[2]], rtol=1e-6
    )


@pytest.mark.parametrize("seed", range(10))
def test_scores_from_logits_equal_scores_from_their_softmax(seed: int):
    """The chunked logits path flags what cleanlab flags on softmax(logits)."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 300)), int(rng.integers(3, 40))
    logits = torch.from_numpy(rng.normal(size=(n, c)) * rng.uniform(0.2, 6)).float()
    labels = rng.integers(0, c, size=n)
    labels[:c] = np.arange(c)
    probs = torch.softmax(logits, dim=1).numpy()
    from_logits = score_predictions(logits=logits, labels=labels)
    expected = find_label_issues(labels, probs, filter_by="confident_learning")
    np.testing.assert_array_equal(from_logits["is_confident_mismatch"].to_numpy(), expected)
    from_probs = score_predictions(probs=probs.astype(np.float64), labels=labels)
    np.testing.assert_allclose(from_logits["entropy"], from_probs["entropy"], atol=2e-5)
    np.testing.assert_allclose(from_logits["margin"], from_probs["margin"], atol=1e-6)


def test_ids_of_one_kind_are_accepted():
    """numpy integers mixed with Python ints are integers; ids of any one kind (floats,
    tuples) are kept as given."""
    frame = score_predictions(
        logits=torch.randn(3, 2), labels=[0, 1, 0], sample_ids=[np.int64(5), 6, np.int32(7)]
    )
    assert frame["sample_id"].tolist() == [5, 6, 7]
    floats = score_predictions(logits=torch.randn(2, 2), labels=[0, 1], sample_ids=[0.5, 1.5])
    assert floats["sample_id"].tolist() == [0.5, 1.5]


def test_pandas_input_scores_without_a_warning():
    """A DataFrame's values are a read-only array, which torch warns about (once per
    process, hence a fresh one): they are copied first."""
    code = (
        "import numpy as np, pandas as pd; from labelwatch import score_predictions;"
        " logits = pd.DataFrame(np.random.default_rng(0).normal(size=(8, 3)));"
        " score_predictions(logits=logits, labels=pd.Series([0, 1, 2, 0, 1, 2, 0, 1]))"
    )
    error = "error:The given NumPy array is not writable:UserWarning"
    done = subprocess.run(
        [sys.executable, "-W", error, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "not writable" not in done.stderr
