"""Weighted k-NN classification of frozen features (the InstDisc / DINO k-NN monitor).

Hand-written: neither timm nor transformers ship one, and scikit-learn's `KNeighborsClassifier` runs on CPU numpy
and would need the whole (queries x train) similarity matrix; this stays on the features' device, chunk by chunk.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted labels (long, on the train features' device) of `query_features`: each of the k nearest train
    features (cosine similarity s) votes for its label with weight exp(s / temperature)."""
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k={k} must be between 1 and the number of train features ({len(train_features)})")
    device = train_features.device
    # fp32: bf16 features lose the similarity differences that exp(s / 0.07) amplifies
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    predictions = []
    for query in query_features.split(chunk_size):
        similarity, index = (F.normalize(query.to(device).float(), dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """k-NN top-1 accuracy of the queries, in percent [0, 100]."""
    predictions = knn_classify(train_features, train_labels, query_features, num_classes, k, temperature, chunk_size)
    return (predictions == query_labels.to(predictions.device)).float().mean().item() * 100
