"""Top-1 / top-5 accuracy as a local `evaluate` metric (`evaluate.load("accuracy")` would fetch from the Hub).

`predictions` are the top-k class indices of each example, best first (k >= 1; only the first 5 are used), so the
Trainer gathers (N, 5) indices instead of (N, num_classes) logits. With fewer than 5 classes every class is in the
list, so top-5 is 1.0 by construction.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fraction of examples whose label is the first predicted class (top1) or among the first five (top5).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per example, class indices sorted by decreasing score (at least 1).
    references (`list` of `int`): ground-truth labels.
Returns:
    top1 (`float`): accuracy of the first prediction, in [0, 1].
    top5 (`float`): fraction of labels among the first five predictions, in [0, 1].
Examples:
    >>> metric = evaluate.load("modeling_ldae/metrics/topk_accuracy/topk_accuracy.py")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0])
    {'top1': 0.5, 'top5': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[list[int]], references: list[int]) -> dict[str, float]:
        topk = np.asarray(predictions, dtype=np.int64)[:, :5]
        hits = topk == np.asarray(references, dtype=np.int64)[:, None]
        return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=1).mean())}
