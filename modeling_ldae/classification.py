"""Linear probing and fine-tuning of l-DAE checkpoints on the `transformers` Trainer (the MAE evaluation protocols,
`ldae-method.md` section 7). `run_linear_probe.py` and `run_finetune.py` are thin command lines over this module.

Data flow: `load_classification_data` (raw rows: undecoded image + class id, checked) -> the Trainer splits the rows
between processes -> `data.DecodingCollator` decodes and transforms only this process's rows -> the model (see
`data.py` for why decoding waits for the collator).

Bad input (labels, checkpoint, PCA, class count, empty split) raises `InputError` before training starts; the scripts
print it as one line.
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
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import cli, hub
from .configuration_ldae import FEATURE_INPUTS
from .data import (
    IGNORED_LABEL,
    DecodingCollator,
    available_splits,
    eval_transform,
    finetune_train_transform,
    find_image_column,
    find_label_column,
    load_image_dataset,
    make_image_processor,
    num_decode_failures,
    probe_train_transform,
    undecoded_columns,
)
from .evaluation import compute_topk_metrics, preprocess_logits_for_metrics
from .modeling_ldae import LDAEForImageClassification
from .optim import build_lars, layer_decay_param_groups, steps_from_epochs

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset
EVAL_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")
# Paper / MAE layer-wise lr decay by (width, encoder depth): ViT-B, ViT-1/2L (project choice), ViT-L.
LAYER_DECAY = {(768, 12): 0.85, (1024, 12): 0.75, (1024, 24): 0.65}
DEFAULT_LAYER_DECAY = 0.75
EMA_FOLDER = "ema"
PREDICTIONS_FILE = "eval_predictions.jsonl"
CARD_RESULTS = ("top1", "top5", "_samples", "protocol", "probe_mode", "model_ema")


class InputError(ValueError):
    """Bad user input (data, checkpoint, flags): reported as one line before training starts."""


# ---------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "An l-DAE checkpoint (pre-training or classifier): a local folder or a Hub id."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded checkpoints."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the cached login)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the checkpoint's own code (l-DAE checkpoints whose code is on the Hub)."}
    )
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
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training examples."})
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
        super().__post_init__()
        # Each process reads its own share; dispatching would make the first process decode every batch for all.
        self.accelerator_config.dispatch_batches = False
        if self.learning_rate is None:
            self.learning_rate = self.base_learning_rate * self.global_batch_size / 256

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps


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


def parse_arguments(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """Flags, optionally after a YAML / JSON file of them (`cli.parse_arguments`); a bad file is an `InputError`."""
    with _as_input_error():
        return cli.parse_arguments(parser, argv)


@contextlib.contextmanager
def report_input_errors(prog: str) -> Iterator[None]:
    """Turn an `InputError` into one line on stderr and exit status 2, as argparse does for a bad flag."""
    try:
        yield
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def _as_input_error() -> Iterator[None]:
    # Loading data and checkpoints fails with ValueError / OSError on bad input; report those as input errors.
    try:
        yield
    except InputError:
        raise
    except (ValueError, OSError) as error:
        raise InputError(" ".join(str(error).split())) from error


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


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class ClassificationData:
    """Raw rows (image column undecoded, integer class ids), checked; `None` for a split that is not used."""

    train: AnyDataset | None
    eval: AnyDataset | None
    image_column: str
    label_column: str
    class_names: list[str]
    num_train_examples: int | None  # None: a stream of unknown size
    num_eval_examples: int | None


def _source(data_args: DataTrainingArguments, directory: str | None = None) -> dict[str, Any]:
    if directory is not None:
        return {"train_dir": directory}
    return {"dataset_name": data_args.dataset_name, "dataset_config_name": data_args.dataset_config_name,
            "train_dir": data_args.train_dir}


def _pick_eval_split(available: list[str], requested: str | None) -> str | None:
    if requested is not None:
        return requested
    return next((name for name in EVAL_SPLIT_CANDIDATES if name in available), None)


def _peek(dataset: datasets.IterableDataset, what: str) -> dict[str, Any]:
    try:
        return next(iter(dataset))
    except StopIteration:
        raise InputError(f"The {what} is empty: it holds no examples.") from None


def _class_names(dataset: AnyDataset, label_column: str, what: str) -> list[str] | None:
    """ClassLabel names; None for a plain integer column (counted from the values); InputError otherwise."""
    feature = (dataset.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        if isinstance(dataset, datasets.IterableDataset):
            raise InputError(
                f"Label column {label_column!r} of the streamed {what} holds plain integers, not a ClassLabel: the "
                "class count would need a pass over the whole stream. Cast it to a ClassLabel or do not stream."
            )
        return None
    raise InputError(
        f"Label column {label_column!r} of the {what} has type {feature}, not integer class ids: cast it to a "
        "ClassLabel (dataset.class_encode_column) or name another column with --label_column_name."
    )


def _label_range(dataset: AnyDataset, label_column: str) -> tuple[int, int]:
    if isinstance(dataset, datasets.IterableDataset):
        # Streams are checked on their first example; ClassLabel guarantees the rest are valid ids or -1.
        value = _peek(dataset, "stream")[label_column]
        return value, value
    values = dataset.select_columns([label_column]).with_format("numpy")[:][label_column]
    return int(values.min()), int(values.max())


def _check_labels(dataset: AnyDataset, label_column: str, num_classes: int, what: str) -> None:
    low, high = _label_range(dataset, label_column)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InputError(
            f"Label column {label_column!r} of the {what} holds {bad}, not a class id in [0, {num_classes}) "
            "(unlabelled splits such as ImageNet's test split use -1): use a labelled split."
        )


def _load_split(source, split, data_args, model_args, what) -> AnyDataset:
    try:
        dataset = load_image_dataset(
            **source, split=split, streaming=data_args.streaming, token=model_args.token, cache_dir=model_args.cache_dir
        )
    except ValueError as error:
        # How datasets words an empty split of a prepared data set.
        if "corresponds to no data" in str(error):
            raise InputError(f"The {what} is empty: it holds no examples.") from error
        raise
    if isinstance(dataset, datasets.IterableDataset):
        _peek(dataset, what)
    elif len(dataset) == 0:
        raise InputError(f"The {what} is empty: it holds no examples.")
    return dataset


def check_launch(training_args: TrainingArguments) -> None:
    """Processes started by torchrun / accelerate that did not form one group would each train alone and overwrite
    each other's output (on a machine without GPUs, unless told to use the CPU)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise InputError(
            f"{launched} processes were launched, but the Trainer sees {training_args.world_size}: on CPU pass "
            "--use_cpu true (or set ACCELERATE_USE_CPU=true) so that they train together."
        )


def load_classification_data(
    data_args: DataTrainingArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> ClassificationData:
    """Load, check and subsample the splits that `--do_train` / `--do_eval` need; raise `InputError` on bad data."""
    check_launch(training_args)
    if not (training_args.do_train or training_args.do_eval):
        raise InputError("Nothing to do: pass --do_train and/or --do_eval.")
    source = _source(data_args)
    with _as_input_error(), training_args.main_process_first(desc="loading the data set"):
        need_train = training_args.do_train
        train = eval_ = None
        if training_args.do_eval:
            eval_source = _source(data_args, data_args.validation_dir) if data_args.validation_dir else source
            available = available_splits(**eval_source, token=model_args.token, cache_dir=model_args.cache_dir)
            eval_split = _pick_eval_split(available, data_args.eval_split_name)
            if eval_split is None and data_args.validation_dir:
                eval_split = available[0] if len(available) == 1 else None
            if eval_split is not None:
                eval_ = _load_split(eval_source, eval_split, data_args, model_args, f"evaluation split {eval_split!r}")
            elif data_args.streaming:
                raise InputError(
                    f"No evaluation split among {available}: pass --eval_split_name or --validation_dir (a stream "
                    "cannot be split for --train_val_split)."
                )
            else:
                need_train = True
        if need_train:
            train = _load_split(source, data_args.train_split_name, data_args, model_args,
                                f"training split {data_args.train_split_name!r}")
        first = train if train is not None else eval_
        image_column = find_image_column(first, data_args.image_column_name)
        label_column = find_label_column(first, data_args.label_column_name)
        for dataset, what in ((train, "training split"), (eval_, "evaluation split")):
            if dataset is not None:
                find_image_column(dataset, image_column)
                find_label_column(dataset, label_column)

        if training_args.do_eval and eval_ is None:
            held_out = train.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed)
            train, eval_ = (held_out["train"] if training_args.do_train else None), held_out["test"]

        train = _subsample(train, data_args.max_train_samples, training_args.seed)
        eval_ = _subsample(eval_, data_args.max_eval_samples, None)
        names = {what: _class_names(dataset, label_column, what)
                 for dataset, what in ((train, "training split"), (eval_, "evaluation split")) if dataset is not None}
        known = [value for value in names.values() if value is not None]
        if len(known) == 2 and known[0] != known[1]:
            raise InputError(
                f"The training and evaluation splits name different classes ({len(known[0])}: {known[0][:5]}... vs "
                f"{len(known[1])}: {known[1][:5]}...): use splits of the same data set."
            )
        if known:
            class_names = known[0]
        else:
            count = max(_label_range(d, label_column)[1] for d in (train, eval_) if d is not None) + 1
            class_names = [str(index) for index in range(count)]
        for dataset, what in ((train, "training split"), (eval_, "evaluation split")):
            if dataset is not None:
                _check_labels(dataset, label_column, len(class_names), what)

    train, eval_ = (None if dataset is None else undecoded_columns(dataset, image_column, label_column)
                    for dataset in (train, eval_))
    num_train = num_eval = None
    if train is not None:
        num_train = _num_examples(train, data_args.train_split_name, data_args.max_train_samples, exact=False)
        if isinstance(train, datasets.IterableDataset) and data_args.shuffle_buffer_size > 0:
            train = train.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    if eval_ is not None:
        num_eval = _num_examples(eval_, eval_split, data_args.max_eval_samples, exact=True)
    return ClassificationData(train, eval_, image_column, label_column, class_names, num_train, num_eval)


def _subsample(dataset: AnyDataset | None, count: int | None, seed: int | None) -> AnyDataset | None:
    if dataset is None or count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    subset = dataset.select(range(min(count, len(dataset))))
    if len(subset) == 0:
        raise InputError("--max_train_samples / --max_eval_samples of 0 leaves an empty split.")
    return subset


def _num_examples(dataset: AnyDataset, split: str, limit: int | None, exact: bool) -> int | None:
    """Rows of a split: its length; for a stream, its recorded size (capped by `limit`), else, where `exact`, a count
    of the raw rows (read once, not decoded), else `limit`."""
    if not isinstance(dataset, datasets.IterableDataset):
        return len(dataset)
    known = (dataset.info.splits or {}).get(split) if "[" not in split else None
    if known is not None and known.num_examples:
        return min(known.num_examples, limit or known.num_examples)
    return sum(1 for _ in dataset) if exact else limit


# ---------------------------------------------------------------------------------------------------- batches


def _even(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # An odd training batch repeats its first example: timm's MixUp pairs examples, and the probe's BatchNorm cannot
    # normalise a batch of one.
    if len(batch["labels"]) % 2 == 0:
        return batch
    return {key: torch.cat([value, value[:1]]) for key, value in batch.items()}


def image_collator(transform: Callable, data: ClassificationData, training: bool) -> Callable:
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
    is not l-DAE, a class count the data disagrees with, or a feature mode whose PCA the checkpoint lacks."""
    path = model_args.model_name_or_path
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                  "token": model_args.token, "trust_remote_code": model_args.trust_remote_code}
    with _as_input_error():
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
    with _as_input_error():
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
    if model.config.feature_input != "clean" and not model.ldae.pca.is_fitted:
        raise InputError(
            f"feature_input={model.config.feature_input!r} needs the checkpoint's PCA tokenizer, but {path!r} has "
            "none fitted (all-zero eigenvalues): use --feature_input clean or a checkpoint with a fitted PCA."
        )
    return model


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


@torch.inference_mode()
def extract_features(trainer: Trainer, dataset: AnyDataset, num_examples: int | None) -> StackDataset:
    """Pooled encoder features and labels of `dataset` through the trainer's evaluation loader (center crop), each
    process encoding its share; every process gets all of them, in order."""
    backbone = trainer.accelerator.unwrap_model(trainer.model).ldae.eval()
    features, labels = [], []
    for batch in trainer.get_eval_dataloader(dataset):
        with trainer.accelerator.autocast():
            pooled = backbone(batch["pixel_values"]).pooler_output
        pooled, batch_labels = trainer.accelerator.gather_for_metrics((pooled.float(), batch["labels"]))
        features.append(pooled.cpu())
        labels.append(batch_labels.cpu())
    features, labels = _evaluated(torch.cat(features).numpy(), torch.cat(labels).numpy(), num_examples)
    return feature_dataset(torch.from_numpy(features), torch.from_numpy(labels))


def feature_probe_trainer(head: FeatureHead, train_features, eval_features, training_args, optimizer,
                          processor=None) -> "ClassificationTrainer":
    """The Trainer of the cached-feature probe: `FeatureHead` on `feature_dataset`s, with the given LARS."""
    return ClassificationTrainer(
        model=head,
        train_dataset=train_features,
        eval_dataset=eval_features,
        data_collator=_collate_training_features,
        eval_data_collator=_collate_features,
        optimizers=(optimizer, None),
        **_trainer_kwargs(training_args, processor, None),
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
    Linear, LARS, base lr 0.1, 10 + 80 epochs) on features from any encoder, so encoders that are not l-DAE models
    (raw pixels, ViTMAE, random networks) are judged by the same probe. `probe_arguments` override
    `LinearProbeTrainingArguments` fields (e.g. `num_train_epochs`, `per_device_train_batch_size`, `seed`).
    Returns top-1 / top-5 on the evaluation features and top-1 on the training features, as fractions."""
    defaults = dict(per_device_train_batch_size=1024, per_device_eval_batch_size=4096, save_strategy="no",
                    logging_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    training_args = LinearProbeTrainingArguments(output_dir=str(output_dir), **{**defaults, **probe_arguments})
    _set_schedule(training_args, len(train_features), streaming=False)
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


def _last_checkpoint(training_args: TrainingArguments) -> str | None:
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if training_args.do_train and Path(training_args.output_dir).is_dir():
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("Resuming from %s (pass a new --output_dir to start over).", checkpoint)
        return checkpoint
    return None


def _set_schedule(training_args: ProtocolTrainingArguments, num_train_examples: int | None, streaming: bool) -> None:
    """Epochs -> steps where the Trainer cannot count them (streams), and warm-up epochs -> steps."""
    batch = training_args.global_batch_size
    if training_args.max_steps <= 0 and streaming:
        if num_train_examples is None:
            raise InputError(
                "The size of the streamed training split is unknown: pass --max_train_samples or --max_steps."
            )
        training_args.max_steps = steps_from_epochs(num_train_examples, batch, training_args.num_train_epochs)
    if training_args.warmup_steps == 0 and training_args.warmup_epochs > 0:
        if num_train_examples is not None:
            warmup = steps_from_epochs(num_train_examples, batch, training_args.warmup_epochs)
        else:
            warmup = round(training_args.max_steps * training_args.warmup_epochs / training_args.num_train_epochs)
        training_args.warmup_steps = warmup


def _trainer_kwargs(training_args, processor, num_eval_examples: int | None) -> dict[str, Any]:
    return {
        "args": training_args,
        "processing_class": processor,
        "compute_metrics": partial(_topk_metrics, num_examples=num_eval_examples),
        "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
    }


def _write_predictions(trainer: Trainer, predictions: np.ndarray, labels: np.ndarray, path: Path) -> None:
    if trainer.is_world_process_zero():
        with open(path, "w") as file:
            for label, top in zip(labels.tolist(), predictions.tolist()):
                file.write(json.dumps({"label": label, "top5": top}) + "\n")


def _finish(
    *,
    protocol: str,
    trainer: Trainer,
    model_trainer: Trainer,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: ProtocolTrainingArguments,
    data: ClassificationData,
    info: dict[str, Any],
    description: str,
    push: bool,
    eval_dataset: AnyDataset | None,
    num_eval_examples: int | None,
    ema: ModelEmaCallback | None = None,
) -> dict[str, Any]:
    """Train (resuming), evaluate (the raw and the EMA weights, with EMA), save the model, predictions, metrics and
    card; push; end the process group. `trainer` trains; `model_trainer` holds the full classifier that is saved."""
    output_dir = Path(training_args.output_dir)
    metrics: dict[str, dict[str, Any]] = {}
    if training_args.do_train:
        checkpoint = _last_checkpoint(training_args)
        if ema is not None and checkpoint is not None:
            ema.resume_from(checkpoint)
        metrics["train"] = trainer.train(resume_from_checkpoint=checkpoint).metrics
        if data.num_train_examples is not None:
            metrics["train"]["train_samples"] = data.num_train_examples
        trainer.save_state()
    if training_args.do_eval:
        metrics["eval"] = {}
        if ema is not None and training_args.do_train:
            raw = trainer.predict(eval_dataset, metric_key_prefix="eval_without_ema").metrics
            metrics["eval"].update({k: v for k, v in raw.items() if k.endswith(("top1", "top5", "loss"))})
    if ema is not None and training_args.do_train:
        # The saved model (and the headline eval_* numbers) hold the EMA weights.
        trainer.model.load_state_dict(ema.ema.module.state_dict())
    if training_args.do_eval:
        prediction = trainer.predict(eval_dataset, metric_key_prefix="eval")
        predictions, labels = _evaluated(prediction.predictions, prediction.label_ids, num_eval_examples)
        metrics["eval"].update(prediction.metrics, eval_samples=len(labels))
        _write_predictions(trainer, predictions, labels, output_dir / PREDICTIONS_FILE)
    failures = trainer.accelerator.gather(torch.tensor([num_decode_failures()], device=training_args.device))
    info = {**info, "decode_failures_per_process": failures.tolist()}
    for split, split_metrics in metrics.items():
        split_metrics.update(info)
        trainer.log_metrics(split, {k: v for k, v in split_metrics.items() if not isinstance(v, list)})
        trainer.save_metrics(split, split_metrics)
    results = {k: v for split_metrics in metrics.values() for k, v in split_metrics.items()}
    if training_args.do_train:
        model_trainer.save_model()
        if training_args.should_save:
            _write_card(protocol, model_args, data_args, training_args, data, description, results)
            if push:
                hub.push_to_hub(output_dir, training_args.hub_model_id or output_dir.name,
                                token=training_args.hub_token, private=training_args.hub_private_repo)
    # What `Trainer.end()` does from transformers 5.18 on. Left to interpreter exit, a gloo worker thread still
    # releasing the last collective's tensor aborts the process ("terminate called without an active exception").
    trainer.accelerator.end_training()
    return results


def _hub_id(name: str | None) -> str | None:
    # Card metadata links Hub ids only, not local paths.
    if name is None or name.startswith(("/", ".", "~")) or Path(name).exists():
        return None
    return name


def _write_card(protocol, model_args, data_args, training_args, data, description, results) -> None:
    arguments = {**{k: v for k, v in asdict(model_args).items() if k != "token"}, **asdict(data_args),
                 **training_args.to_dict()}
    hub.write_model_card(
        training_args.output_dir,
        model_name=training_args.hub_model_id or Path(training_args.output_dir).name,
        base_model=_hub_id(model_args.model_name_or_path),
        datasets=_hub_id(data_args.dataset_name),
        pipeline_tag="image-classification",
        tags=["ldae", "vision", "image-classification", protocol.replace("_", "-")],
        description=f"{description}\n\nPre-trained checkpoint: `{model_args.model_name_or_path}`. Data: "
        f"`{data_args.dataset_name or data_args.train_dir}` ({len(data.class_names)} classes). Usage: "
        '`pipeline("image-classification", model=...)` (import `modeling_ldae`, or pass `trust_remote_code=True`).',
        training_arguments=arguments,
        results={k: v for k, v in results.items() if k.endswith(CARD_RESULTS)},
    )


def _features_description(config) -> str:
    return (f"{config.feature_input} image at t = {config.feature_timestep}, average-pooled output of "
            f"{config.num_hidden_layers} encoder blocks")


def run_linear_probe(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: LinearProbeTrainingArguments
) -> dict[str, Any]:
    """MAE's linear probe: frozen backbone in eval mode, BatchNorm (no affine) + Linear head, LARS; augmented images
    or, with `cache_features`, features extracted once. Returns the metrics (also in `all_results.json`); the
    distributed process group is ended, as the run's last step."""
    setup_logging(training_args)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # the Trainer would push every checkpoint
    data = load_classification_data(data_args, model_args, training_args)
    model = load_classifier(model_args, data.class_names, "linear_probe")
    model.ldae.requires_grad_(False)
    _set_schedule(training_args, data.num_train_examples, data_args.streaming)
    size = model.config.image_size
    processor = make_image_processor(size)
    eval_collator = image_collator(eval_transform(size), data, training=False)
    lars = build_lars(model, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
                      momentum=training_args.lars_momentum, trust_coefficient=training_args.lars_trust_coefficient)
    mode = "cached_features" if training_args.cache_features else "augmented"
    image_trainer = ClassificationTrainer(
        model=model,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=image_collator(probe_train_transform(size), data, training=True),
        eval_data_collator=eval_collator,
        optimizers=(lars, None),
        frozen_backbone=True,
        **_trainer_kwargs(training_args, processor, data.num_eval_examples),
    )
    trainer, eval_dataset, num_eval_examples = image_trainer, data.eval, data.num_eval_examples
    if training_args.cache_features:
        train_features = eval_dataset = None
        if training_args.do_train:
            train_features = extract_features(image_trainer, data.train, data.num_train_examples)
        if training_args.do_eval:
            eval_dataset = extract_features(image_trainer, data.eval, data.num_eval_examples)
            num_eval_examples = None  # exactly the evaluation examples
        trainer = feature_probe_trainer(FeatureHead.of(model), train_features, eval_dataset, training_args, lars,
                                        processor)
    description = (
        f"Linear probe (MAE protocol, {mode.replace('_', ' ')}) of a frozen l-DAE encoder: "
        f"{_features_description(model.config)}; BatchNorm without affine + Linear head trained with LARS "
        f"(lr {training_args.learning_rate:g}, batch {training_args.global_batch_size}, "
        f"{training_args.num_train_epochs:g} epochs, {training_args.warmup_epochs:g} warm-up, cosine). "
        + ("Features were extracted once from center crops, without augmentation."
           if training_args.cache_features else "Training images: random resized crop + flip.")
    )
    return _finish(protocol="linear_probe", trainer=trainer, model_trainer=image_trainer, model_args=model_args,
                   data_args=data_args, training_args=training_args, data=data,
                   info={"protocol": "linear_probe", "probe_mode": mode}, description=description, push=push,
                   eval_dataset=eval_dataset, num_eval_examples=num_eval_examples)


def run_finetune(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: FineTuneTrainingArguments
) -> dict[str, Any]:
    """MAE's end-to-end fine-tuning of the merged model: LayerNorm + Linear head, layer-wise lr decay, AdamW, drop
    path, RandAugment, random erasing, MixUp/CutMix with soft-target cross-entropy, EMA (saved). Returns the metrics;
    the distributed process group is ended, as the run's last step."""
    setup_logging(training_args)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # the Trainer would push every checkpoint
    data = load_classification_data(data_args, model_args, training_args)
    model = load_classifier(model_args, data.class_names, "fine_tune", drop_path_rate=training_args.drop_path_rate)
    if not model.config.time_conditioning_merged:
        model.merge_time_conditioning()
    _set_schedule(training_args, data.num_train_examples, data_args.streaming)
    layer_decay = training_args.layer_decay or default_layer_decay(model.config)
    optimizer = torch.optim.AdamW(
        layer_decay_param_groups(model, training_args.learning_rate, training_args.weight_decay, layer_decay),
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
    )
    mixup = None
    if training_args.mixup_alpha > 0 or training_args.cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=training_args.mixup_alpha, cutmix_alpha=training_args.cutmix_alpha,
                      label_smoothing=training_args.label_smoothing_factor, num_classes=len(data.class_names))
    ema = ModelEmaCallback(training_args.model_ema_decay) if training_args.model_ema else None
    size = model.config.image_size
    trainer = ClassificationTrainer(
        model=model,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=image_collator(
            finetune_train_transform(size, training_args.rand_augment, training_args.random_erasing), data,
            training=True,
        ),
        eval_data_collator=image_collator(eval_transform(size), data, training=False),
        optimizers=(optimizer, None),
        # Without MixUp/CutMix the Trainer's own label smoothing applies to class ids.
        compute_loss_func=soft_target_cross_entropy if mixup is not None else None,
        mixup=mixup,
        callbacks=[ema] if ema is not None else None,
        **_trainer_kwargs(training_args, make_image_processor(size), data.num_eval_examples),
    )
    description = (
        f"End-to-end fine-tuning (MAE protocol) of an l-DAE encoder, time conditioning merged at "
        f"t = {model.config.merged_timestep}: {_features_description(model.config)}; LayerNorm + Linear head. AdamW "
        f"(lr {training_args.learning_rate:g}, batch {training_args.global_batch_size}, weight decay "
        f"{training_args.weight_decay:g}), layer decay {layer_decay:g}, {training_args.num_train_epochs:g} epochs, "
        f"{training_args.warmup_epochs:g} warm-up, cosine; drop path {training_args.drop_path_rate:g}, RandAugment "
        f"{training_args.rand_augment}, random erasing {training_args.random_erasing:g}, MixUp "
        f"{training_args.mixup_alpha:g} / CutMix {training_args.cutmix_alpha:g}, label smoothing "
        f"{training_args.label_smoothing_factor:g}"
        + (f", EMA {training_args.model_ema_decay:g}: the saved weights are the EMA (eval_*; eval_without_ema_* "
           "are the raw weights)." if ema is not None else ".")
    )
    return _finish(protocol="fine_tune", trainer=trainer, model_trainer=trainer, model_args=model_args,
                   data_args=data_args, training_args=training_args, data=data,
                   info={"protocol": "fine_tune", "model_ema": training_args.model_ema}, description=description,
                   push=push, eval_dataset=data.eval, num_eval_examples=data.num_eval_examples, ema=ema)
