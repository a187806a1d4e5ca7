"""Temperature-weighted k-NN classifier on features."""

import pytest
import torch

from modeling_ldae.knn import knn_classify, knn_top1


def test_separable_clusters_are_classified_perfectly():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator) * 10
    train_labels, query_labels = torch.arange(5).repeat(40), torch.arange(5).repeat(10)
    train = centers[train_labels] + torch.randn(200, 16, generator=generator)
    query = centers[query_labels] + torch.randn(50, 16, generator=generator)
    assert knn_top1(train, train_labels, query, query_labels, num_classes=5, k=20) == 100.0


def test_temperature_weighting_overrides_majority():
    # One class-0 neighbour identical to the query, two class-1 neighbours at cosine 0.8.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # not unit norm: normalised inside
    # exp(1 / 0.07) > 2 exp(0.8 / 0.07); at a huge temperature every vote weighs ~1, i.e. plain majority.
    assert knn_classify(train, train_labels, query, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    assert knn_classify(train, train_labels, query, num_classes=2, k=3, temperature=1e3).tolist() == [1]


def test_chunking_does_not_change_predictions():
    generator = torch.Generator().manual_seed(1)
    train, train_labels = torch.randn(300, 8, generator=generator), torch.randint(0, 7, (300,), generator=generator)
    query = torch.randn(101, 8, generator=generator)
    whole = knn_classify(train, train_labels, query, num_classes=7, k=10, chunk_size=1024)
    chunked = knn_classify(train, train_labels, query, num_classes=7, k=10, chunk_size=16)
    assert torch.equal(whole, chunked)
    assert whole.dtype == torch.long and whole.shape == (101,)


def test_k_larger_than_train_set_raises():
    with pytest.raises(ValueError, match=r"k=5 must be between 1 and the number of train features \(3\)"):
        knn_classify(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(2, 4), num_classes=2, k=5)
