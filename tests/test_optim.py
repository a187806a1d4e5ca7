"""Parameter groups (weight decay, layer decay under the transformers cosine schedule), LARS and schedule lengths."""

import math

import pytest
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from modeling_ldae.cli import InputError
from modeling_ldae.optim import (
    adamw_param_groups,
    build_lars,
    layer_decay_param_groups,
    schedule_lengths,
    steps_from_epochs,
)

NUM_BLOCKS = 3


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.blocks = nn.ModuleList(_Block() for _ in range(NUM_BLOCKS))
        self.norm = nn.LayerNorm(8)


class TinyClassifier(nn.Module):
    """Parameter names and group_matcher of the l-DAE classifier, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.ldae = _Backbone()
        self.classifier = nn.Module()
        self.classifier.linear = nn.Linear(8, 3)

    def group_matcher(self, coarse: bool = False) -> dict:
        # (?:...): timm converts capture groups of a dict matcher to floats, so only block indices may be captured
        return {"stem": r"^ldae\.(?:embeddings|time_embedder)", "blocks": [(r"^ldae\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"ldae.embeddings.proj.weight"}


def _layer_of(name: str) -> int:
    if name.startswith("ldae.embeddings"):
        return 0
    if name.startswith("ldae.blocks."):
        return int(name.split(".")[2]) + 1
    return NUM_BLOCKS + 1  # head, and the final norm, which the matcher leaves unmatched


def test_adamw_groups_no_decay_on_1d_and_listed_names():
    model = TinyClassifier()
    groups = adamw_param_groups(model, weight_decay=0.05)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, param in model.named_parameters():
        expected = param.ndim >= 2 and name != "ldae.embeddings.proj.weight"
        assert (id(param) in decay) == expected, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_effective_lr_under_cosine_schedule():
    model = TinyClassifier()
    lr, decay, warmup, total = 4e-3, 0.75, 10, 100
    groups = layer_decay_param_groups(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    assert all(g["params"] for g in groups)
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
    optimizer.step()
    scheduler.step()
    factor = 1 / warmup
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            expected = lr * decay ** (NUM_BLOCKS + 1 - _layer_of(name))
            assert group["lr"] == pytest.approx(expected * factor), name
            assert group["lr_scale"] == pytest.approx(expected / lr), name
            assert group["weight_decay"] == (0.0 if param.ndim < 2 or name == "ldae.embeddings.proj.weight" else 0.05)
    assert seen == set(names.values())
    for _ in range(total - 1):
        scheduler.step()
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in optimizer.param_groups)


def test_layer_decay_requires_group_matcher():
    with pytest.raises(TypeError, match="group_matcher"):
        layer_decay_param_groups(nn.Linear(2, 2), lr=1.0, weight_decay=0.0, layer_decay=0.75)


def test_lars_trust_ratio_on_weights_plain_sgd_on_bias():
    torch.manual_seed(0)
    lr, trust, momentum = 0.5, 1e-3, 0.9
    linear = nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.mul_(10)  # the adapted update must follow |w|, not |g|
    reference_bias = linear.bias.detach().clone().requires_grad_()
    sgd = torch.optim.SGD([reference_bias], lr=lr, momentum=momentum)
    optimizer = build_lars(linear, lr=lr, momentum=momentum, trust_coefficient=trust)
    assert [g["always_adapt"] for g in optimizer.param_groups] == [True, False]
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)

    for step in range(2):
        x = torch.randn(8, 16)
        weight_before = linear.weight.detach().clone()
        linear.zero_grad()
        sgd.zero_grad()
        linear(x).square().sum().backward()
        reference_bias.grad = linear.bias.grad.clone()
        optimizer.step()
        sgd.step()
        if step == 0:  # momentum buffer = trust_ratio * g, so the update is lr * trust * |w| whatever |g|
            update = (linear.weight - weight_before).norm()
            assert update.item() == pytest.approx(lr * trust * weight_before.norm().item(), rel=1e-4)
        torch.testing.assert_close(linear.bias, reference_bias)


def test_lars_skips_frozen_params_and_accepts_iterables():
    linear = nn.Linear(4, 2)
    linear.weight.requires_grad_(False)
    optimizer = build_lars(linear.parameters(), lr=0.1)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [linear.bias]


def test_steps_from_epochs_counts_partial_batches():
    assert steps_from_epochs(50_000, 1024, 90) == math.ceil(50_000 / 1024) * 90
    assert steps_from_epochs(50_000, 1024, 0.5) == 25
    assert steps_from_epochs(2048, 1024, 100 * 0.07) == 14


def test_schedule_lengths_count_epochs_unless_steps_are_given():
    # 1000 examples at a global batch of 64: 16 steps per epoch, the last one partial.
    assert schedule_lengths(1000, 64, num_train_epochs=2, warmup_epochs=0.5) == (32, 8)
    assert schedule_lengths(1000, 64, num_train_epochs=2, max_steps=10, warmup_epochs=0.5) == (10, 8)
    assert schedule_lengths(1000, 64, num_train_epochs=2, warmup_epochs=0.5, warmup_steps=3) == (32, 3)
    assert schedule_lengths(1000, 64, num_train_epochs=1, warmup_epochs=5) == (16, 16)  # never past the end
    assert schedule_lengths(1000, 64, num_train_epochs=2) == (32, 0)


def test_schedule_lengths_of_a_stream_of_unknown_size():
    # The warm-up is the same fraction of the given steps as of the epochs.
    assert schedule_lengths(None, 64, num_train_epochs=4, max_steps=100, warmup_epochs=1) == (100, 25)
    with pytest.raises(InputError, match=r"pass --max_steps, or the number of training examples"):
        schedule_lengths(None, 64, num_train_epochs=4)
