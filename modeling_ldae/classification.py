"""Linear probing and fine-tuning of l-DAE checkpoints on the `transformers` Trainer (the MAE evaluation protocols,
`docs/method.md`, "Recipes"): what `run_linear_probe.py` and `run_finetune.py` share beyond the package's common
plumbing (`cli`, `data`, `optim`, `hub`, `features`).

Data flow: `data.load_labelled_splits` (raw rows: undecoded image + class id, checked) -> the Trainer splits the rows
between processes -> `image_collator` decodes and transforms only this process's rows -> the model (see `data.py`
for why decoding waits for the collator).
"""

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import StackDataset
from transformers import (
    AutoConfig,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import features, hub
from .cli import InputError
from .configuration_ldae import FEATURE_INPUTS
from .data import (
    EVAL_SPLIT_CANDIDATES,
    IGNORED_LABEL,
    DataSource,
    DecodingCollator,
    LabelledSplits,
    load_labelled_splits,
    num_decode_failures,
)
from .evaluation import compute_topk_metrics, preprocess_logits_for_metrics
from .modeling_ldae import LDAEForImageClassification
from .optim import build_lars, schedule_lengths

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset
# Paper / MAE layer-wise lr decay by (width, encoder depth): ViT-B, ViT-1/2L (project choice), ViT-L.
LAYER_DECAY = {(768, 12): 0.85, (1024, 12): 0.75, (1024, 24): 0.65}
DEFAULT_LAYER_DECAY = 0.75
EMA_FOLDER = "ema"
PREDICTIONS_FILE = "eval_predictions.jsonl"
CARD_RESULTS = ("top1", "top5", "_samples", "protocol", "probe_mode", "model_ema")


# ---------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "An l-DAE checkpoint (pre-training or classifier): a local folder or a Hub id."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded checkpoints."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the cached login)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a classifier checkpoint's head when its class count differs."}
    )
    feature_input: str | None = field(
        default=None,
        metadata={"help": "Override the checkpoint's feature input.", "choices": list(FEATURE_INPUTS)},
    )
    feature_timestep: int | None = field(
        default=None, metadata={"help": "Override the t the encoder is conditioned on (paper: 10)."}
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Encoder depth: re-split a pre-training checkpoint's stack (paper ablation)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set id (e.g. ILSVRC/imagenet-1k) or a local data set folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The data set configuration."})
    train_dir: str | None = field(
        default=None, metadata={"help": "A local folder of class sub-folders of images, or of parquet/arrow shards."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "A local folder holding the validation set."})
    train_split_name: str = field(default="train", metadata={"help": "The training split (slicing syntax allowed)."})
    eval_split_name: str | None = field(
        default=None, metadata={"help": f"The evaluation split; default: the first of {EVAL_SPLIT_CANDIDATES} present."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training split held out when there is no evaluation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (map-style: a seeded random subset)."}
    )
    num_train_examples: int | None = field(
        default=None, metadata={"help": "Size of a stream whose info does not give it (turns epochs into steps)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation examples."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; default: the first of image, img, jpg."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column; default: the first of label, labels, cls."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of preparing it on disk."})
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Shuffle buffer of a streamed training set (0: keep the stream's order)."}
    )


@dataclass
class ProtocolTrainingArguments(TrainingArguments):
    """`TrainingArguments` with MAE's learning-rate and warm-up conventions and what the image pipeline requires."""

    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate; default: base_learning_rate x global batch size / 256."}
    )
    base_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate per 256 examples of batch."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warm-up, in epochs (unless --warmup_steps)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up (MAE: cosine)."})

    def __post_init__(self):
        # The collator decodes the raw image column, so the Trainer must keep it.
        self.remove_unused_columns = False
        if self.disable_tqdm is None and not sys.stderr.isatty():  # as run_pretrain.py: no bar in a job's log
            self.disable_tqdm = True
        super().__post_init__()
        # Each process reads its own share; dispatching would make the first process decode every batch for all.
        self.accelerator_config.dispatch_batches = False
        if self.learning_rate is None:
            self.learning_rate = self.base_learning_rate * self.global_batch_size / 256

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps

    def set_schedule_lengths(self, num_train_examples: int | None) -> None:
        """`max_steps` and `warmup_steps` from the epochs of `num_train_examples` (None: a stream of unknown size),
        unless given: the Trainer cannot count a stream's epochs, and it has no warm-up in epochs."""
        self.max_steps, self.warmup_steps = schedule_lengths(
            num_train_examples, self.global_batch_size, self.num_train_epochs, self.max_steps, self.warmup_epochs,
            self.warmup_steps)


@dataclass
class LinearProbeTrainingArguments(ProtocolTrainingArguments):
    num_train_epochs: float = field(default=90.0, metadata={"help": "Training epochs (MAE probe: 90)."})
    base_learning_rate: float = field(default=0.1, metadata={"help": "LARS learning rate per 256 examples (MAE: 0.1)."})
    warmup_epochs: float = field(default=10.0, metadata={"help": "Linear warm-up epochs (MAE probe: 10)."})
    lars_momentum: float = field(default=0.9, metadata={"help": "LARS momentum."})
    lars_trust_coefficient: float = field(default=0.001, metadata={"help": "LARS trust coefficient."})
    cache_features: bool = field(
        default=False,
        metadata={"help": "Extract features once (center crop, no augmentation) and train the head on them."},
    )


@dataclass
class FineTuneTrainingArguments(ProtocolTrainingArguments):
    num_train_epochs: float = field(default=100.0, metadata={"help": "Training epochs (MAE fine-tuning: 100)."})
    base_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate per 256 examples."})
    warmup_epochs: float = field(default=5.0, metadata={"help": "Linear warm-up epochs (MAE fine-tuning: 5)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms and biases)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing."})
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise lr decay; default: 0.85 ViT-B, 0.75 ViT-1/2L, 0.65 ViT-L."}
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last encoder block."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "MixUp alpha (0: off)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix alpha (0: off)."})
    rand_augment: str = field(default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment policy ('': off)."})
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    model_ema: bool = field(default=True, metadata={"help": "Keep an EMA of the weights and save it as the model."})
    model_ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step."})


# ---------------------------------------------------------------------------------------------------- setup


def check_trainer_arguments(training_args: TrainingArguments) -> None:
    """`InputError` for a run with nothing to do, or for processes started by torchrun / accelerate that did not form
    one group: each would train alone and overwrite the others' output (on a machine without GPUs, unless told to
    use the CPU)."""
    if not (training_args.do_train or training_args.do_eval):
        raise InputError("Nothing to do: pass --do_train and/or --do_eval.")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise InputError(
            f"{launched} processes were launched, but the Trainer sees {training_args.world_size}: on CPU pass "
            "--use_cpu true (or set ACCELERATE_USE_CPU=true) so that they train together."
        )


def take_over_push(training_args: TrainingArguments) -> str | None:
    """The repository id to push the finished folder to, checked now rather than after training, or None. Turns off
    the Trainer's own push, which would upload every checkpoint and write its own README.md over the model card."""
    if not training_args.push_to_hub:
        return None
    training_args.push_to_hub = False
    return hub.repo_id(training_args.hub_model_id, training_args.output_dir)


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------- batches


def _even(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # An odd training batch repeats its first example: timm's MixUp pairs examples, and the probe's BatchNorm cannot
    # normalise a batch of one.
    if len(batch["labels"]) % 2 == 0:
        return batch
    return {key: torch.cat([value, value[:1]]) for key, value in batch.items()}


def image_collator(transform: Callable, data: LabelledSplits, training: bool) -> Callable:
    """The Trainer's collate function over `data.DecodingCollator`. Images that fail to decode are counted and, in
    training, dropped; in evaluation they stay as blank images labelled `IGNORED_LABEL`, because processes gather
    equal-sized batches, and the metrics leave them out."""
    decoding = DecodingCollator(transform, data.image_column, data.label_column,
                                failed_images="drop" if training else "blank")
    return partial(_trainer_batch, decoding=decoding, training=training)


def _trainer_batch(rows: list[dict[str, Any]], decoding: DecodingCollator, training: bool) -> dict[str, torch.Tensor]:
    batch = decoding(rows)
    if batch is None:  # the Trainer cannot skip a batch
        raise RuntimeError(
            f"All {len(rows)} images of a batch failed to decode ({num_decode_failures()} so far in this process): "
            "check the data set."
        )
    return _even(batch) if training else batch


def _collate_features(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"features": torch.stack([row["features"] for row in rows]),
            "labels": torch.stack([row["labels"] for row in rows])}


def _collate_training_features(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return _even(_collate_features(rows))


# ---------------------------------------------------------------------------------------------------- model


def default_layer_decay(config) -> float:
    return LAYER_DECAY.get((config.hidden_size, config.num_hidden_layers), DEFAULT_LAYER_DECAY)


def load_classifier(
    model_args: ModelArguments, class_names: list[str], classifier_head: str, **config_overrides
) -> LDAEForImageClassification:
    """An `LDAEForImageClassification` for `class_names` from any l-DAE checkpoint; `InputError` on a checkpoint that
    cannot be loaded or is not l-DAE, a class count the data disagrees with, or a feature mode whose PCA the
    checkpoint lacks."""
    path = model_args.model_name_or_path
    if hub.hub_id(path) is None and not Path(path).expanduser().is_dir():
        raise InputError(f"--model_name_or_path {path!r} is not a checkpoint folder (nor a Hub id): pass the folder "
                         "that run_pretrain.py or a Trainer script wrote, or a Hub id.")
    # No --trust_remote_code: the scripts run the installed l-DAE classes, which transformers' Auto classes prefer
    # to a checkpoint's own code anyway (a registered class wins), so the flag could change nothing.
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    with _checkpoint_errors(path):
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    if config.model_type != "ldae":
        kind = ", ".join(config.architectures or []) or type(config).__name__
        raise InputError(
            f"--model_name_or_path {path!r} is a {config.model_type!r} checkpoint ({kind}), not an l-DAE one "
            "(model_type 'ldae'): pass an l-DAE pre-training or classification checkpoint."
        )
    is_classifier = "LDAEForImageClassification" in (config.architectures or [])
    if is_classifier and config.num_labels != len(class_names) and not model_args.ignore_mismatched_sizes:
        raise InputError(
            f"The classifier checkpoint {path!r} has num_labels = {config.num_labels}, but the data has "
            f"{len(class_names)} classes: use a matching checkpoint, or --ignore_mismatched_sizes to start a new head."
        )
    overrides = {name: getattr(model_args, name) for name in ("feature_input", "feature_timestep", "num_hidden_layers")
                 if getattr(model_args, name) is not None}
    merged_at = config.merged_timestep if config.time_conditioning_merged else None
    if merged_at is not None and overrides.get("feature_timestep", merged_at) != merged_at:
        raise InputError(
            f"--feature_timestep {overrides['feature_timestep']}: the checkpoint's time conditioning is merged at "
            f"t = {merged_at}, so it has no other t; drop the flag or use an unmerged checkpoint."
        )
    with _checkpoint_errors(path):
        model = LDAEForImageClassification.from_pretrained(
            path,
            id2label=dict(enumerate(class_names)),
            label2id={name: index for index, name in enumerate(class_names)},
            classifier_head=classifier_head,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **overrides,
            **config_overrides,
            **hub_kwargs,
        )
    config = model.config
    if config.feature_input != "clean" or config.denoiser_input == "latent":
        if not model.ldae.latent_tokenizer.is_fitted:
            what = f"feature_input={config.feature_input!r}" if config.feature_input != "clean" else \
                "A latent-input model (denoiser_input='latent')"
            kind = "PCA tokenizer" if config.tokenizer_type == "pca" else f"{config.tokenizer_type} tokenizer"
            raise InputError(f"{what} needs the checkpoint's {kind}, but {path!r} has none fitted or trained: use "
                             "--feature_input clean, or a checkpoint whose tokenizer was fitted in pre-training.")
    return model


@contextlib.contextmanager
def _checkpoint_errors(path: str) -> Iterator[None]:
    # How `from_pretrained` says that a path or Hub id holds no (loadable) checkpoint.
    try:
        yield
    except (OSError, ValueError) as error:
        raise InputError(f"--model_name_or_path {path!r} cannot be loaded ({' '.join(str(error).split())[:300]}): "
                         "pass a local checkpoint folder or a Hub id you can read (--token).") from None


class FeatureHead(nn.Module):
    """MAE's probe head (BatchNorm without affine + Linear) on cached pooled features. `of(model)` shares the
    classifier's own head (so the saved classifier holds what was trained); `new(dim, num_labels)` makes one for
    features of any encoder."""

    def __init__(self, fc_norm: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.fc_norm = fc_norm
        self.classifier = classifier

    @classmethod
    def of(cls, model: LDAEForImageClassification) -> "FeatureHead":
        return cls(model.fc_norm, model.classifier)

    @classmethod
    def new(cls, feature_dim: int, num_labels: int) -> "FeatureHead":
        head = cls(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), nn.Linear(feature_dim, num_labels))
        nn.init.trunc_normal_(head.classifier.weight, std=0.01)  # as LDAEForImageClassification's probe head
        nn.init.zeros_(head.classifier.bias)
        return head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        logits = self.classifier(self.fc_norm(features))
        return ImageClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def feature_dataset(features: torch.Tensor, labels: torch.Tensor) -> StackDataset:
    """Cached features as a map-style data set of {"features", "labels"} rows (in memory, no Arrow round trip)."""
    return StackDataset(features=features, labels=labels)


def cached_features(trainer: Trainer, dataset: AnyDataset, num_examples: int | None) -> StackDataset:
    """Pooled encoder features and labels of `dataset` through the trainer's evaluation loader (center crop), each
    process encoding its share under the trainer's autocast; every process gets all of them, in order."""
    backbone = trainer.accelerator.unwrap_model(trainer.model).ldae.eval()
    pooled, labels = features.extract_features(lambda pixels: backbone(pixels).pooler_output,
                                               trainer.get_eval_dataloader(dataset), accelerator=trainer.accelerator)
    pooled, labels = _evaluated(pooled.numpy(), labels.numpy(), num_examples)
    return feature_dataset(torch.from_numpy(pooled), torch.from_numpy(labels))


def feature_probe_trainer(head: FeatureHead, train_features: StackDataset | None,
                          eval_features: StackDataset | None, training_args: TrainingArguments,
                          optimizer: torch.optim.Optimizer) -> "ClassificationTrainer":
    """The Trainer of the cached-feature probe: `FeatureHead` on `feature_dataset`s, with the given LARS."""
    return ClassificationTrainer(
        model=head,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_features,
        data_collator=_collate_training_features,
        eval_data_collator=_collate_features,
        optimizers=(optimizer, None),
        compute_metrics=topk_metrics(num_examples=None),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )


def linear_probe_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    output_dir: str | Path,
    num_labels: int,
    **probe_arguments,
) -> dict[str, float]:
    """The `--cache_features` linear probe (MAE protocol defaults of `LinearProbeTrainingArguments`: BatchNorm +
    Linear, LARS, base lr 0.1, 90 epochs, 10 of them warm-up) on features from any encoder, so encoders that are not l-DAE models
    (raw pixels, ViTMAE, random networks) are judged by the same probe. `probe_arguments` override
    `LinearProbeTrainingArguments` fields (e.g. `num_train_epochs`, `per_device_train_batch_size`, `seed`).
    Returns top-1 / top-5 on the evaluation features and top-1 on the training features, as fractions."""
    defaults = dict(per_device_train_batch_size=1024, per_device_eval_batch_size=4096, save_strategy="no",
                    logging_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    training_args = LinearProbeTrainingArguments(output_dir=str(output_dir), **{**defaults, **probe_arguments})
    training_args.set_schedule_lengths(len(train_features))
    head = FeatureHead.new(train_features.shape[1], num_labels)
    lars = build_lars(head, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
                      momentum=training_args.lars_momentum, trust_coefficient=training_args.lars_trust_coefficient)
    trainer = feature_probe_trainer(head, feature_dataset(train_features, train_labels), None, training_args, lars)
    trainer.train()
    evaluation = trainer.evaluate(feature_dataset(eval_features, eval_labels), metric_key_prefix="eval")
    training = trainer.evaluate(feature_dataset(train_features, train_labels), metric_key_prefix="train")
    return {"top1": evaluation["eval_top1"], "top5": evaluation["eval_top5"], "train_top1": training["train_top1"]}


def _evaluated(predictions: np.ndarray, labels: np.ndarray, num_examples: int | None) -> tuple[np.ndarray, ...]:
    """Only the evaluation examples: without the repeats that pad a stream's last batch across processes (accelerate
    cannot drop them from a stream, which has no length; they come last) and the images that failed to decode."""
    predictions, labels = predictions[:num_examples], labels[:num_examples]
    keep = labels != IGNORED_LABEL
    return predictions[keep], labels[keep]


def topk_metrics(num_examples: int | None) -> Callable[[EvalPrediction], dict[str, float]]:
    """The Trainer's `compute_metrics`: top-1 / top-5 of the first `num_examples` predictions (None: all), leaving
    out images that failed to decode."""
    return partial(_topk_metrics, num_examples=num_examples)


def _topk_metrics(eval_pred: EvalPrediction, num_examples: int | None) -> dict[str, float]:
    return compute_topk_metrics(EvalPrediction(*_evaluated(eval_pred.predictions, eval_pred.label_ids, num_examples)))


# ---------------------------------------------------------------------------------------------------- training


def soft_target_cross_entropy(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: soft-target cross-entropy on MixUp/CutMix targets (label smoothing is in
    them), plain cross-entropy on class ids (evaluation). Normalised by the Trainer's example count when given, so
    gradient accumulation and multi-process averaging stay exact."""
    logits = outputs["logits"].float()
    if labels.is_floating_point():
        loss = SoftTargetCrossEntropy()(logits, labels)
    else:
        loss = F.cross_entropy(logits, labels)
    return loss if num_items_in_batch is None else loss * len(labels) / num_items_in_batch


class ClassificationTrainer(Trainer):
    """The Trainer with separate training and evaluation collators, MixUp/CutMix on training batches, and the
    probe's frozen backbone kept in eval mode (the Trainer switches the whole model to train mode every step)."""

    def __init__(self, *args, eval_data_collator: Callable | None = None, mixup: Mixup | None = None,
                 frozen_backbone: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.mixup = mixup
        self.frozen_backbone = frozen_backbone

    @contextlib.contextmanager
    def _evaluation_collator(self) -> Iterator[None]:
        training_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            if self.frozen_backbone:
                self.accelerator.unwrap_model(model).ldae.eval()
            if self.mixup is not None:
                inputs = dict(inputs)
                inputs["pixel_values"], inputs["labels"] = self.mixup(inputs["pixel_values"], inputs["labels"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class ModelEmaCallback(TrainerCallback):
    """timm's `ModelEmaV3` of the trained model, updated after every optimizer step and saved in every checkpoint
    (`checkpoint-N/ema/`, a loadable model) so that resuming continues it."""

    def __init__(self, decay: float):
        self.decay = decay
        self.ema: ModelEmaV3 | None = None
        self._resume_state: dict[str, torch.Tensor] | None = None

    def resume_from(self, checkpoint: str | Path) -> None:
        weights = Path(checkpoint) / EMA_FOLDER / "model.safetensors"
        if weights.exists():
            self._resume_state = load_file(weights)
        else:
            logger.warning("%s holds no EMA weights: the EMA restarts from the resumed weights.", checkpoint)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Here the model is on its device and holds any resumed weights.
        self.ema = ModelEmaV3(model, decay=self.decay)
        if self._resume_state is not None:
            self.ema.module.load_state_dict(self._resume_state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.ema.module.save_pretrained(
                Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / EMA_FOLDER
            )


# ---------------------------------------------------------------------------------------------------- run steps


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments,
              training_args: TrainingArguments) -> LabelledSplits:
    """`data.load_labelled_splits` for the run's flags; the main process first, so that the others read its cache."""
    source = DataSource(data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, model_args.token,
                        model_args.cache_dir)
    with training_args.main_process_first(desc="loading the data set"):
        return load_labelled_splits(source, data_args, training_args.do_train, training_args.do_eval,
                                    training_args.seed)


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`, else the last `checkpoint-N` in `--output_dir` when training, else None."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if training_args.do_train and Path(training_args.output_dir).is_dir():
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("Resuming from %s (pass a new --output_dir to start over).", checkpoint)
        return checkpoint
    return None


def evaluate_with_predictions(trainer: Trainer, dataset: AnyDataset, num_examples: int | None) -> dict[str, Any]:
    """`eval_*` metrics of exactly the evaluation examples (the first `num_examples` predictions, None: all, less the
    images that failed to decode) and, from the main process, each one's label and top-5 classes in
    `eval_predictions.jsonl`, the file the metrics can be recomputed from."""
    prediction = trainer.predict(dataset, metric_key_prefix="eval")
    predictions, labels = _evaluated(prediction.predictions, prediction.label_ids, num_examples)
    if trainer.is_world_process_zero():
        with open(Path(trainer.args.output_dir) / PREDICTIONS_FILE, "w") as file:
            for label, top in zip(labels.tolist(), predictions.tolist()):
                file.write(json.dumps({"label": label, "top5": top}) + "\n")
    return {**prediction.metrics, "eval_samples": len(labels)}


def log_and_save_metrics(trainer: Trainer, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Log `metrics` and save them to `{split}_results.json` and `all_results.json`, with each process's count of
    images that failed to decode so far (a collective: every process must call it). Returns what was saved."""
    failures = trainer.accelerator.gather(torch.tensor([num_decode_failures()], device=trainer.args.device))
    metrics = {**metrics, "decode_failures_per_process": failures.tolist()}
    trainer.log_metrics(split, {name: value for name, value in metrics.items() if not isinstance(value, list)})
    trainer.save_metrics(split, metrics)
    return metrics


def end_process_group(trainer: Trainer) -> None:
    """What `Trainer.end()` does from transformers 5.18 on. Left to interpreter exit, a gloo worker thread still
    releasing the last collective's tensor aborts the process ("terminate called without an active exception")."""
    trainer.accelerator.end_training()


def describe_features(config) -> str:
    return (f"{config.feature_input} image at t = {config.feature_timestep}, average-pooled output of "
            f"{config.num_hidden_layers} encoder blocks")


def write_classifier_card(protocol: str, description: str, config, model_args: ModelArguments,
                          data_args: DataTrainingArguments, training_args: TrainingArguments, data: LabelledSplits,
                          results: dict[str, Any]) -> None:
    """The output folder's README.md for the classifier of `config`: Hub metadata, `description`, how to use it, the
    evaluation's top-1 / top-5 on its data set and split as model-index, the other results and the arguments (no
    token)."""
    arguments = {**{k: v for k, v in asdict(model_args).items() if k != "token"}, **asdict(data_args),
                 **training_args.to_dict()}
    eval_results = []
    if "eval_top1" in results:
        dataset = hub.CardDataset.of(data.eval_source.name, data.eval_split, data.eval_source.dataset_config_name)
        task = {"linear_probe": "Linear probe (MAE protocol)", "fine_tune": "Fine-tuning (MAE protocol)"}[protocol]
        eval_results = [hub.accuracy_result(results[f"eval_top{k}"], f"Top-{k} accuracy", task, dataset, top_k=k,
                                            num_examples=results["eval_samples"]) for k in (1, 5)]
    hub.write_model_card(
        training_args.output_dir,
        model_name=training_args.hub_model_id or Path(training_args.output_dir).name,
        config=config,
        base_model=hub.hub_id(model_args.model_name_or_path),
        datasets=hub.hub_id(data_args.dataset_name),
        pipeline_tag="image-classification",
        tags=["ldae", "vision", "image-classification", protocol.replace("_", "-")],
        description=f"{description}\n\nPre-trained checkpoint: `{model_args.model_name_or_path}`. Data: "
        f"`{data_args.dataset_name or data_args.train_dir}` ({len(data.class_names)} classes).",
        eval_results=eval_results,
        figures={k: v for k, v in results.items() if k.endswith(CARD_RESULTS)},
        training_arguments=arguments,
    )
