"""kNN label agreement: clusters, chunking, small N and input checks."""

from __future__ import annotations

import pytest
import torch

from labelwatch.neighbours import (
    approximate_neighbours,
    has_direction,
    knn_agreement,
    knn_label_distribution,
    knn_neighbours,
    label_agreement,
    label_distribution,
    neighbour_labels,
)


def _clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight clusters of 20 points on different axes; point 0 is labelled 1, not 0."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 10
    labels = torch.arange(3).repeat_interleave(20)
    points = centres[labels] + 0.1 * torch.randn(60, 8, generator=generator)
    noisy = labels.clone()
    noisy[0] = 1
    return points, noisy


def test_mislabelled_point_gets_low_agreement_and_clean_points_one():
    """A point labelled 1 inside cluster 0 has no agreeing neighbour; others agree fully."""
    points, noisy = _clusters()
    agreement = knn_agreement(points, noisy, k=5)
    assert agreement[0] == 0.0
    assert torch.all(agreement[20:] == 1.0)
    # Cluster-0 points may have the mislabelled point among their 5 neighbours.
    assert torch.all(agreement[1:20] >= 0.8)


def test_chunked_equals_unchunked():
    """Any chunk size gives exactly the result of a single block."""
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(300, 16, generator=generator)
    labels = torch.randint(0, 4, (300,), generator=generator)
    whole = knn_label_distribution(points, labels, k=7, chunk_size=300)
    for chunk_size in (1, 17, 128):
        assert torch.equal(
            knn_label_distribution(points, labels, k=7, chunk_size=chunk_size), whole
        )


def test_ties_pick_the_lowest_indices():
    """With equal similarities the first samples are the neighbours, whatever the chunk."""
    points = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])
    # Point 4 is orthogonal to all the others: its 2 neighbours are samples 0 and 1.
    distribution = knn_label_distribution(points, labels, k=2, chunk_size=1)
    assert distribution[4].tolist() == [0.5, 0.5]


def test_matches_a_brute_force_reference_with_repeated_points():
    """Each sample's neighbours are the k most similar others, lower index first among
    equals: checked against sorting every row, on data where many similarities tie."""
    generator = torch.Generator().manual_seed(2)
    distinct = torch.randn(40, 6, generator=generator)
    points = distinct[torch.randint(0, 40, (150,), generator=generator)]  # many repeats
    labels = torch.randint(0, 5, (150,), generator=generator)
    k = 6
    normed = torch.nn.functional.normalize(points, dim=1)
    sim = (normed @ normed.T).fill_diagonal_(-torch.inf).tolist()
    expected = torch.zeros(150, 5)
    for i, row in enumerate(sim):
        nearest = sorted(range(150), key=lambda j: (-row[j], j))[:k]
        for j in nearest:
            expected[i, labels[j]] += 1 / k
    for chunk_size in (7, None):
        got = knn_label_distribution(points, labels, k=k, chunk_size=chunk_size)
        torch.testing.assert_close(got, expected)


def test_k_larger_than_n_uses_every_other_sample():
    """k >= N takes the N - 1 other samples (or N with the sample itself)."""
    points = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    assert knn_agreement(points, labels, k=100).tolist() == pytest.approx([1 / 3] * 4)
    assert knn_agreement(points, labels, k=100, exclude_self=False).tolist() == [0.5] * 4


def test_single_sample_agrees_with_itself():
    """With no other sample the agreement is 1 (nothing contradicts the label)."""
    assert knn_agreement(torch.ones(1, 3), torch.tensor([2])).tolist() == [1.0]


def test_distribution_rows_sum_to_one_with_requested_classes():
    """The distribution has num_classes columns and rows summing to 1."""
    points, noisy = _clusters()
    distribution = knn_label_distribution(points, noisy, 5, k=4)
    assert distribution.shape == (60, 5)
    assert torch.allclose(distribution.sum(dim=1), torch.ones(60))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embeddings": torch.ones(3)}, r"`embeddings` must be a 2-D floating-point"),
        ({"embeddings": torch.ones(3, 2, dtype=torch.long)}, r"`embeddings` must be a 2-D"),
        ({"labels": torch.tensor([0.0, 1.0, 0.0])}, r"`labels` must be a 1-D tensor of integer"),
        ({"labels": torch.tensor([0, 1])}, r"`labels` has 2 entries but `embeddings` has 3"),
        ({"labels": torch.tensor([0, -1, 0])}, r"`labels` must be class indices >= 0, got -1"),
        ({"k": 0}, r"`k` must be an integer >= 1, got 0"),
        ({"chunk_size": 0}, r"`chunk_size` must be None or an integer >= 1, got 0"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    """Each invalid argument is named in the error message."""
    arguments = {"embeddings": torch.ones(3, 2), "labels": torch.tensor([0, 1, 0])} | kwargs
    embeddings, labels = arguments.pop("embeddings"), arguments.pop("labels")
    with pytest.raises(ValueError, match=match):
        knn_agreement(embeddings, labels, **arguments)


def test_num_classes_must_cover_the_labels():
    """A num_classes smaller than the largest label + 1 is refused."""
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer > every label"):
        knn_label_distribution(torch.ones(3, 2), torch.tensor([0, 1, 2]), 2)


def test_neighbour_indices_give_the_distribution_and_the_agreement():
    """knn_neighbours' (N, k) indices, as labels, give knn_label_distribution and
    knn_agreement exactly."""
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(120, 6, generator=generator)
    labels = torch.randint(0, 4, (120,), generator=generator)
    neighbours = knn_neighbours(points, k=5, chunk_size=50)
    assert neighbours.shape == (120, 5) and not (neighbours == torch.arange(120)[:, None]).any()
    distribution = label_distribution(labels[neighbours], 4)
    assert torch.equal(distribution, knn_label_distribution(points, labels, 4, k=5))
    agreement = knn_agreement(points, labels, k=5)
    assert torch.equal(agreement, distribution.gather(1, labels[:, None]).squeeze(1))
    normed = torch.nn.functional.normalize(points, dim=1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-torch.inf)
    reference = similarity.topk(5, dim=1).indices
    assert (neighbours == reference).float().mean() > 0.99  # float rounding may swap
    assert torch.equal(label_agreement(labels[neighbours], labels, 4), agreement)
    nobody = torch.empty(2, 0, dtype=torch.long)
    assert label_distribution(nobody, 4).eq(0.25).all()
    assert label_agreement(nobody, labels[:2], 4).eq(0.25).all()


def test_the_approximate_search_finds_the_exact_cosine_neighbours_above_8192_points():
    """Above ann's exact threshold the inverted-file search on normalised rows finds (at
    least 99% of) the exact cosine neighbours, whatever the rows' lengths."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(60, 32, generator=generator)
    labels = torch.randint(0, 60, (9000,), generator=generator)
    points = centres[labels] + 0.6 * torch.randn(9000, 32, generator=generator)
    points *= torch.rand(9000, 1, generator=generator) * 10 + 0.1  # cosine ignores length
    approximate = approximate_neighbours(points, k=10)
    exact = knn_neighbours(points, k=10)
    assert approximate.shape == exact.shape == (9000, 10)
    found = (approximate[:, :, None] == exact[:, None, :]).any(dim=2).float().mean()
    assert found >= 0.99


def test_the_approximate_search_falls_back_to_the_exact_one_for_many_identical_rows():
    """Half the rows identical (a collapsed layer) would make one giant cell, slower than
    the exact search: the exact neighbours are returned instead, tie rule included."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(400, 16, generator=generator)
    points[::2] = 1.0
    assert torch.equal(approximate_neighbours(points, k=10), knn_neighbours(points, k=10))


def _with_rows_without_direction() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clusters with six rows inserted that have no direction (zero, NaN, +-inf) at
    the front, where the old tie rule made them everybody's first pick; and the mask of
    the cluster rows."""
    points, noisy = _clusters()
    bad = torch.zeros(6, 8)
    bad[2, 3], bad[3, 0], bad[4, 7], bad[5] = torch.nan, torch.inf, -torch.inf, torch.nan
    points = torch.cat([bad, points])
    labels = torch.cat([torch.tensor([0, 1, 2, 0, 1, 2]), noisy])
    return points, labels, torch.arange(66) >= 6


def test_a_row_without_direction_is_nobodys_neighbour_and_has_none():
    """All-zero and non-finite rows have no direction (has_direction): their neighbours
    are -1, their agreement and label distribution NaN, and every other row gets exactly
    the neighbours it has without them, on the exact and the approximate search."""
    points, labels, clean = _with_rows_without_direction()
    assert torch.equal(has_direction(points), clean)
    for search in (knn_neighbours, approximate_neighbours):
        neighbours = search(points, k=5)
        assert neighbours.shape == (66, 5)
        assert neighbours[:6].eq(-1).all()
        assert torch.equal(neighbours[clean], search(points[clean], k=5) + 6)
    agreement = knn_agreement(points, labels, k=5)
    assert agreement[:6].isnan().all()
    assert torch.equal(agreement[clean], knn_agreement(points[clean], labels[clean], k=5))
    distribution = knn_label_distribution(points, labels, 3, k=5)
    assert distribution[:6].isnan().all()
    assert torch.equal(
        distribution[clean], knn_label_distribution(points[clean], labels[clean], 3, k=5)
    )


def test_neighbour_labels_keep_the_missing_marker():
    """neighbour_labels gives -1 for an index -1, which label_distribution and
    label_agreement turn into NaN, instead of the last sample's label."""
    labels = torch.tensor([0, 1, 2])
    neighbours = torch.tensor([[1, 2], [-1, -1], [0, 1]])
    found = neighbour_labels(labels, neighbours)
    assert found.tolist() == [[1, 2], [-1, -1], [0, 1]]
    assert label_agreement(found, labels, 3)[1].isnan()
    distribution = label_distribution(found, 3)
    assert distribution[1].isnan().all() and distribution[[0, 2]].sum(dim=1).eq(1).all()


def test_with_one_row_with_direction_no_row_has_neighbours():
    """A single row with a direction among directionless ones has no candidate neighbour:
    every row's neighbours are -1."""
    points = torch.zeros(4, 3)
    points[2] = 1.0
    assert knn_neighbours(points, k=3).tolist() == [[-1]] * 4
    assert knn_agreement(points, torch.tensor([0, 1, 0, 1]), k=3).isnan().all()
