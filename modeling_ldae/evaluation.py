"""Trainer hooks for top-1 / top-5 accuracy, backed by the local `topk_accuracy` evaluate metric.

Usage: `Trainer(..., compute_metrics=compute_topk_metrics,
               preprocess_logits_for_metrics=preprocess_logits_for_metrics)`.
"""

import functools
from pathlib import Path

import evaluate
import torch
from transformers import EvalPrediction

TOPK_ACCURACY_PATH = Path(__file__).resolve().parent / "metrics" / "topk_accuracy" / "topk_accuracy.py"


@functools.cache
def load_topk_accuracy() -> evaluate.Metric:
    """The metric, loaded by file path (works with HF_HUB_OFFLINE=1).

    In memory: every process of a distributed run calls `compute_metrics`, and file-backed metrics of the same
    experiment would share cache files.
    """
    return evaluate.load(str(TOPK_ACCURACY_PATH), keep_in_memory=True)


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor
) -> torch.Tensor:
    """Reduce logits to the top-5 class indices on device, so only (B, 5) integers are gathered and kept."""
    if isinstance(logits, tuple):  # the model returned extra outputs (hidden states, attentions)
        logits = logits[0]
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def compute_topk_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`top1` / `top5` accuracy (fractions) from the indices of `preprocess_logits_for_metrics`."""
    return load_topk_accuracy().compute(predictions=eval_pred.predictions, references=eval_pred.label_ids)
