"""Optimizer parameter groups, LARS and schedule lengths for l-DAE training (AdamW pre-training, layer-decay
fine-tuning, LARS probe), shared by the three scripts.

The learning-rate schedule is `transformers.get_cosine_schedule_with_warmup` (linear warm-up, half cosine to 0);
`schedule_lengths` turns the epoch-based recipes (or explicit step counts) into its step counts.
"""

import math
from collections.abc import Iterable
from typing import Any

from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .cli import InputError


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: `weight_decay` on >= 2-D weights, none on 1-D params (norms, biases) or `no_weight_decay()`."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_weight_decay_names(model))


def layer_decay_param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Layer-wise lr decay (BEiT/MAE) groups from `model.group_matcher(coarse=False)`: lr * layer_decay**(L + 1 - i).

    Layer 0 is the stem, 1..L the blocks, L + 1 everything unmatched (the head). timm turns every regex capture
    group of a dict matcher into a float, so only block indices may be captured: write the stem as
    `^ldae\\.(?:embeddings|time_embedder)`, not with `(...)`.
    Each group's `lr` is already scaled (and overrides the optimizer's default `lr`) because only timm schedulers
    apply timm's `lr_scale`, kept for logging. Hand the optimizer to the Trainer as `optimizers=(optimizer, scheduler)`.
    """
    if not hasattr(model, "group_matcher"):
        # timm would fall back to grouping parameters 12 at a time, silently unrelated to the blocks
        raise TypeError(f"{type(model).__name__} has no group_matcher(); layer decay needs one")
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=_no_weight_decay_names(model),
        layer_decay=layer_decay,
    )
    return [{**group, "lr": lr * group["lr_scale"]} for group in groups if group["params"]]


def build_lars(
    params_or_model: nn.Module | Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> Lars:
    """LARS as in MAE's linear probe: trust ratio on >= 2-D weights even at zero weight decay; plain SGD-momentum
    without weight decay on 1-D params (biases, norms). Frozen params (`requires_grad=False`) are left out.

    timm's `Lars` reads `always_adapt` and `weight_decay` per param group, so two groups express the split.
    Its trust ratio is `trust_coeff * |w| / (|g| + weight_decay * |w|)`, MAE's
    `trust_coeff * |w| / |g + weight_decay * w|`: identical at the probe's zero weight decay.
    """
    params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "always_adapt": True},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars(
        [group for group in groups if group["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coefficient
    )


def steps_from_epochs(num_examples: int, global_batch: int, epochs: float) -> int:
    """Optimizer steps in `epochs` (may be fractional, rounded half up) epochs, counted as the Trainer does without
    `dataloader_drop_last`.

    `global_batch` = per-device batch * processes * gradient accumulation; the last partial batch is a step.
    Give the total to `TrainingArguments(max_steps=...)` too, so the schedule and the Trainer agree exactly.
    """
    return math.floor(math.ceil(num_examples / global_batch) * epochs + 0.5)


def schedule_lengths(
    num_examples: int | None,
    global_batch: int,
    num_train_epochs: float,
    max_steps: int | None = None,
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps): `max_steps` / `warmup_steps` where given (> 0), else counted from
    epochs of `num_examples`. `InputError` when epochs must be counted but the size is unknown (a stream)."""
    if max_steps is None or max_steps <= 0:
        if num_examples is None:
            raise InputError("The training data does not tell its size (a stream), so --num_train_epochs cannot "
                             "become steps: pass --max_steps, or the number of training examples "
                             "(--num_train_examples / --max_train_samples).")
        max_steps = steps_from_epochs(num_examples, global_batch, num_train_epochs)
    if warmup_steps is None or warmup_steps <= 0:
        if not warmup_epochs:
            warmup_steps = 0
        elif num_examples is not None:
            warmup_steps = steps_from_epochs(num_examples, global_batch, warmup_epochs)
        else:  # the same fraction of the run as the epochs say
            warmup_steps = round(max_steps * warmup_epochs / num_train_epochs)
    return max_steps, min(warmup_steps, max_steps)
