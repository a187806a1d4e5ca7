"""The local top-k accuracy metric and its Trainer hooks, offline."""

import socket

import numpy as np
import pytest
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput

from modeling_ldae.evaluation import compute_topk_metrics, load_topk_accuracy, preprocess_logits_for_metrics


def _direct_topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def _evaluate(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = preprocess_logits_for_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    return compute_topk_metrics(EvalPrediction(predictions=predictions.numpy(), label_ids=labels))


def test_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the metric tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    load_topk_accuracy.cache_clear()
    metric = load_topk_accuracy()
    assert metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0]) == {"top1": 0.5, "top5": 1.0}


def test_matches_numpy_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((257, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 257)
    result = _evaluate(logits, labels)
    assert result["top1"] == pytest.approx(_direct_topk(logits, labels, 1))
    assert result["top5"] == pytest.approx(_direct_topk(logits, labels, 5))
    assert 0 < result["top1"] < result["top5"] < 1


def test_extra_model_outputs_are_ignored():
    logits = torch.tensor([[0.1, 0.9, 0.0]])
    indices = preprocess_logits_for_metrics((logits, torch.zeros(1, 4, 8)), torch.tensor([1]))
    assert indices.tolist() == [[1, 0, 2]]


@pytest.mark.parametrize("num_classes", [2, 5])
def test_at_most_five_classes_top5_is_one(num_classes):
    rng = np.random.default_rng(num_classes)
    logits = rng.standard_normal((64, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 64)
    result = _evaluate(logits, labels)
    assert result["top1"] == pytest.approx(_direct_topk(logits, labels, 1))
    assert result["top5"] == 1.0


class _FixedLogits(nn.Module):
    """Returns the logits stored for each example index, as a classifier would compute them."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, index: torch.Tensor, labels: torch.Tensor) -> ImageClassifierOutput:
        logits = self.logits[index] + self.dummy
        return ImageClassifierOutput(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_trainer_hooks(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((45, 12)).astype(np.float32)
    labels = rng.integers(0, 12, 45)
    trainer = Trainer(
        model=_FixedLogits(torch.from_numpy(logits)),
        args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, use_cpu=True),
        eval_dataset=[{"index": i, "labels": int(label)} for i, label in enumerate(labels)],
        compute_metrics=compute_topk_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_top1"] == pytest.approx(_direct_topk(logits, labels, 1))
    assert metrics["eval_top5"] == pytest.approx(_direct_topk(logits, labels, 5))


def test_classifier_metrics_score_only_the_evaluation_examples():
    """The scripts' `compute_metrics` leaves out images that failed to decode (labelled IGNORED_LABEL) and the repeats
    that pad a stream's last batch across processes (they come after the first `num_examples`)."""
    from modeling_ldae.classification import topk_metrics
    from modeling_ldae.data import IGNORED_LABEL

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((40, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 40)
    labels[[3, 17]] = IGNORED_LABEL
    padded_logits, padded_labels = np.concatenate([logits, logits[:6]]), np.concatenate([labels, labels[:6]])
    predictions = preprocess_logits_for_metrics(torch.from_numpy(padded_logits), torch.from_numpy(padded_labels))
    result = topk_metrics(num_examples=40)(EvalPrediction(predictions=predictions.numpy(), label_ids=padded_labels))
    keep = labels != IGNORED_LABEL
    assert result["top1"] == pytest.approx(_direct_topk(logits[keep], labels[keep], 1))
    assert result["top5"] == pytest.approx(_direct_topk(logits[keep], labels[keep], 5))
