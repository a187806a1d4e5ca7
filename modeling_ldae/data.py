"""Image data sets, decoding and transforms shared by the pre-training, linear-probe and fine-tune scripts.

Pipeline: `load_image_dataset` -> `find_image_column` / `find_label_column` -> `undecoded_columns` (raw rows, images
still encoded) -> the data split between processes (Accelerate, the Trainer) -> `torch.utils.data.DataLoader(...,
collate_fn=DecodingCollator(<one of the *_transform functions>, ...))`.

Images are decoded in the collate function, not in a `datasets` map: a map runs before the per-process split whenever
a stream has fewer shards than processes, so every process would decode everything. Decoding here rather than by
`datasets` also means one corrupt file costs one example, not the run: a failure is counted
(`num_decode_failures()`, per process), logged, and dropped or blanked by `DecodingCollator`.

All transforms map a PIL image to a float32 CHW tensor normalised with mean 0.5 / std 0.5 (values in [-1, 1]
except where random erasing adds Gaussian noise), resampling bicubic with antialiasing.
"""

from __future__ import annotations

import logging
import multiprocessing
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import datasets
import PIL.Image
import timm.data
import torch
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from timm.data.auto_augment import RandAugment
from torchvision.transforms import v2

from .cli import InputError
from .modeling_ldae import make_image_processor  # noqa: F401 (lives with the model: checkpoints save it)

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset
Transform = Callable[[PIL.Image.Image], torch.Tensor]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls")
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)
# ConvNextImageProcessor crops only below this size; from it on it warps to (size, size).
CONVNEXT_CROP_BELOW = 384
IGNORED_LABEL = -100  # the label losses ignore; marks the blank stand-in for an image that failed to decode
# timm's increasing posterize keeps 4 - int(0.4 m) bits: 0 at the clipped magnitude 10, which Pillow 13 rejects (a
# fine-tune run died on ~0.3% of images). Capping magnitudes just below 10 keeps every op's strength.
RAND_AUGMENT_MAX_MAGNITUDE = 9.99

_SHARD_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_BICUBIC = v2.InterpolationMode.BICUBIC
# Shared memory so that failures in forked DataLoader workers reach the main process; workers started with
# spawn/forkserver re-import this module and count only in their own copy.
_decode_failures = multiprocessing.Value("q", 0)
_LOG_FIRST_FAILURES = 10
_LOG_FAILURES_EVERY = 1000
_IMAGE_DECODER = datasets.Image()


# ---------------------------------------------------------------------------------------------------- loading


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | Path | None = None,
    split: str = "train",
    streaming: bool = False,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> AnyDataset:
    """Load one split of an image data set.

    `dataset_name` is a Hub id (e.g. `ILSVRC/imagenet-1k`) or a local folder laid out like a Hub data set.
    `train_dir` is a local folder of images (class subfolders give labels) or of `.parquet` / `.arrow` shards;
    split names are inferred from folder / file names (`train/`, `val/`, `test-00000.parquet`, ...), and a
    folder without them is one `train` split. `split` accepts the `datasets` slicing syntax for map-style sets.
    """
    builder = _builder(dataset_name, dataset_config_name, train_dir, token, cache_dir)
    # datasets words this error differently for map-style and streaming sets, and only after preparing every split.
    available = _available_splits(builder)
    missing = [name for name in _split_names(split) if available and name not in available]
    if missing:
        raise InputError(
            f"Split {missing[0]!r} not found in {train_dir if train_dir is not None else dataset_name}; available "
            f"splits: {', '.join(available)}. Pass one of these (--train_split_name / --eval_split_name)."
        )
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def available_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | Path | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """The split names `load_image_dataset` accepts for this source (same arguments); empty if it lists none."""
    return _available_splits(_builder(dataset_name, dataset_config_name, train_dir, token, cache_dir))


def _builder(dataset_name, dataset_config_name, train_dir, token, cache_dir) -> datasets.DatasetBuilder:
    if (dataset_name is None) == (train_dir is None):
        raise InputError(
            "Pass exactly one of dataset_name (a Hub id or a local data set folder) and train_dir "
            f"(a local folder of images or parquet/arrow shards); got dataset_name={dataset_name!r}, "
            f"train_dir={train_dir!r}."
        )
    if train_dir is not None:
        builder_kwargs = _folder_builder_kwargs(Path(train_dir).expanduser())
    else:
        if dataset_name.startswith(("/", ".", "~")) and not Path(dataset_name).expanduser().is_dir():
            raise InputError(f"dataset_name {dataset_name!r} looks like a local path but is not a folder: fix it.")
        builder_kwargs = {"path": dataset_name, "name": dataset_config_name}
    return datasets.load_dataset_builder(**builder_kwargs, token=token, cache_dir=cache_dir)


def _available_splits(builder: datasets.DatasetBuilder) -> list[str]:
    # Split names come from file and folder names (data_files), else from the data set's recorded info.
    return [str(name) for name in (builder.config.data_files or builder.info.splits or {})]


def _split_names(split: str) -> list[str]:
    """Base split names of a split spec such as `train[:10%]+validation`."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _folder_builder_kwargs(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InputError(
            f"train_dir {folder} does not exist or is not a folder: pass a folder of class subfolders of images "
            "or of .parquet/.arrow shards."
        )
    for file in folder.rglob("*"):
        if file.name in ImageFolder.METADATA_FILENAMES:
            continue
        suffix = file.suffix.lower()
        if suffix in _SHARD_BUILDERS:
            # Only the shards: a folder written by save_to_disk also holds json files the shard readers reject.
            data_files = DataFilesDict.from_patterns(
                get_data_patterns(str(folder)), str(folder), allowed_extensions=[suffix]
            )
            return {"path": _SHARD_BUILDERS[suffix], "data_files": data_files}
        if suffix in ImageFolder.EXTENSIONS:
            return {"path": "imagefolder", "data_dir": str(folder)}
    raise InputError(
        f"train_dir {folder} contains no image files (.jpg, .png, ...) and no .parquet/.arrow shards: "
        "point it at the folder that holds them."
    )


@dataclass(frozen=True)
class DataSource:
    """Where a script's images come from: a Hub id or local data set folder (`dataset_name`), or a local folder of
    images or shards (`train_dir`), with the Hub access to read it."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_dir: str | None = None
    token: str | None = None
    cache_dir: str | None = None

    @property
    def name(self) -> str:
        return str(self.train_dir if self.train_dir is not None else self.dataset_name)

    @property
    def is_local(self) -> bool:
        return self.train_dir is not None or Path(self.dataset_name).expanduser().exists()

    def _arguments(self) -> dict[str, Any]:
        return {"dataset_name": None if self.train_dir is not None else self.dataset_name,
                "dataset_config_name": self.dataset_config_name, "train_dir": self.train_dir,
                "token": self.token, "cache_dir": self.cache_dir}

    def splits(self) -> list[str]:
        return available_splits(**self._arguments())

    def load(self, split: str, streaming: bool) -> AnyDataset:
        try:
            return load_image_dataset(**self._arguments(), split=split, streaming=streaming)
        except InputError:
            raise
        except ValueError as error:
            if "corresponds to no data" in str(error):  # how datasets words an empty split of a prepared data set
                raise InputError(f"The split {split!r} of {self.name} is empty: it holds no examples.") from None
            raise InputError(f"{self.name}: {' '.join(str(error).split())}") from None
        except (OSError, datasets.exceptions.DatasetNotFoundError) as error:
            raise InputError(f"{self.name}: {' '.join(str(error).split())[:300]}") from None


def open_split(
    source: DataSource,
    split: str,
    streaming: bool,
    max_samples: int | None = None,
    shuffle_seed: int | None = None,
    num_examples: int | None = None,
    count_stream: bool = False,
) -> tuple[AnyDataset, int | None]:
    """One split, checked not empty, cut to `max_samples` (the first ones; a `shuffle_seed` picks a seeded random
    subset of a map-style split instead), and its number of examples: the length of a map-style split; for a stream
    `num_examples` if given, else its recorded size, else with `count_stream` a count of its rows (read once, not
    decoded), else `max_samples` (None: unknown). `InputError` for a missing, unreadable or empty split."""
    dataset = source.load(split, streaming)
    if max_samples is not None and max_samples <= 0:
        raise InputError(f"max_*_samples = {max_samples} leaves the split {split!r} empty: pass a positive number.")
    if isinstance(dataset, datasets.IterableDataset):
        # Read without decoding: a corrupt image must cost one example later, not fail the check.
        if next(iter(dataset.decode(False)), None) is None:
            raise InputError(f"The split {split!r} of {source.name} is empty: point the data flags at images.")
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        if num_examples is None:
            recorded = (dataset.info.splits or {}).get(split) if "[" not in split else None
            num_examples = recorded.num_examples if recorded is not None and recorded.num_examples else None
        if num_examples is None and count_stream:
            num_examples = sum(1 for _ in dataset.decode(False))
        if num_examples is not None and max_samples is not None:
            num_examples = min(num_examples, max_samples)
        return dataset, num_examples if num_examples is not None else max_samples
    if len(dataset) == 0:
        raise InputError(f"The split {split!r} of {source.name} is empty: point the data flags at images.")
    if max_samples is not None:
        if shuffle_seed is not None:
            dataset = dataset.shuffle(seed=shuffle_seed)
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, len(dataset)


def default_num_workers(processes_per_machine: int = 1, cap: int = 8) -> int:
    """Decoding workers per process: the cores each process has beyond its own, at most `cap` (MAE's loaders
    use 10 on machines with many cores per GPU; on a 2-core machine this is 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cap, cores // max(1, processes_per_machine) - 1))


# ---------------------------------------------------------------------------------------------------- columns


def _column_names(dataset: AnyDataset) -> list[str]:
    if dataset.features is not None:
        return list(dataset.features)
    # A streamed set may not know its schema before the first example is read.
    return list(next(iter(dataset)))


def _find_column(dataset: AnyDataset, requested: str | None, candidates: tuple[str, ...], kind: str) -> str:
    columns = _column_names(dataset)
    if requested is not None:
        if requested not in columns:
            raise InputError(f"{kind} column {requested!r} not found; the data set has columns {columns}.")
        return requested
    found = next((name for name in candidates if name in columns), None)
    if found is None:
        raise InputError(
            f"No {kind} column found among {list(candidates)}; the data set has columns {columns}: "
            f"name the {kind} column with --{kind}_column_name."
        )
    return found


def find_image_column(dataset: AnyDataset, requested: str | None = None) -> str:
    """Return `requested` if it exists, else the first of `image`, `img`, `jpg`; ValueError listing columns."""
    return _find_column(dataset, requested, IMAGE_COLUMN_CANDIDATES, "image")


def find_label_column(dataset: AnyDataset, requested: str | None = None) -> str:
    """Return `requested` if it exists, else the first of `label`, `labels`, `cls`; ValueError listing columns."""
    return _find_column(dataset, requested, LABEL_COLUMN_CANDIDATES, "label")


# ---------------------------------------------------------------------------------------------------- decoding


def num_decode_failures() -> int:
    """Images that failed to decode so far in this process and its forked DataLoader workers."""
    return _decode_failures.value


def decode_image(value: Any) -> PIL.Image.Image | None:
    """Decode an undecoded `datasets.Image` value (`{"bytes", "path"}`), a path, file bytes or a PIL image to RGB.

    Returns None, counts and logs the failure instead of raising, for corrupt, truncated or unreadable files.
    """
    if isinstance(value, bytes):
        value = {"bytes": value, "path": None}
    try:
        if not isinstance(value, PIL.Image.Image):  # datasets 4.x decodes an image again, and fails
            value = _IMAGE_DECODER.decode_example(value)
        return value.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any unreadable image must cost one example, not the run
        with _decode_failures.get_lock():
            _decode_failures.value += 1
            count = _decode_failures.value
        if count <= _LOG_FIRST_FAILURES or count % _LOG_FAILURES_EVERY == 0:
            logger.warning("Skipping an undecodable image (%d so far): %s: %s", count, _describe(value), error)
        return None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        return f"<{len(value.get('bytes') or b'')} bytes>"
    return repr(value)[:200]


# ---------------------------------------------------------------------------------------------------- transforms


def _to_normalized_tensor() -> list[v2.Transform]:
    # Geometry runs on uint8 tensors (rounded and clamped), so bicubic overshoot cannot leave [-1, 1].
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(NORMALIZE_MEAN, NORMALIZE_STD), v2.ToPureTensor()]


def pretrain_transform(
    image_size: int, random_resized_crop: bool = False, scale: tuple[float, float] = (0.2, 1.0)
) -> Transform:
    """Paper default: resize the short side to `image_size`, center crop; or MAE's random resized crop + flip."""
    if random_resized_crop:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=_BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(image_size, interpolation=_BICUBIC, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *geometry, *_to_normalized_tensor()])


def _center_crop_floor(image: torch.Tensor, size: int) -> torch.Tensor:
    # ConvNextImageProcessor floors the crop offset where v2.CenterCrop rounds: 1 px apart on odd margins.
    height, width = image.shape[-2:]
    return v2.functional.crop(image, (height - size) // 2, (width - size) // 2, size, size)


def eval_transform(image_size: int, crop_pct: float = 0.875) -> Transform:
    """Resize the short side to `int(image_size / crop_pct)` and center crop, as `make_image_processor` does.

    Like ConvNextImageProcessor, from `image_size` 384 on the image is resized to a square without cropping.
    """
    if image_size < CONVNEXT_CROP_BELOW:
        geometry = [
            v2.Resize(int(image_size / crop_pct), interpolation=_BICUBIC, antialias=True),
            v2.Lambda(partial(_center_crop_floor, size=image_size)),
        ]
    else:
        geometry = [v2.Resize((image_size, image_size), interpolation=_BICUBIC, antialias=True)]
    return v2.Compose([v2.ToImage(), *geometry, *_to_normalized_tensor()])


def probe_train_transform(image_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> Transform:
    """MAE linear-probe training augmentation: random resized crop + horizontal flip."""
    return pretrain_transform(image_size, random_resized_crop=True, scale=scale)


def finetune_train_transform(
    image_size: int, rand_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25
) -> Transform:
    """MAE fine-tune augmentation (timm): random resized crop, flip, RandAugment, random erasing (pixel mode).

    RandAugment magnitudes are capped at `RAND_AUGMENT_MAX_MAGNITUDE`, so that posterize never asks for 0 bits."""
    transform = timm.data.create_transform(
        input_size=image_size,
        is_training=True,
        auto_augment=rand_augment,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        mean=NORMALIZE_MEAN,
        std=NORMALIZE_STD,
    )
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                # timm clips magnitudes to magnitude_max, or to 10 where that is None (as `or` reads it).
                op.magnitude_max = min(op.magnitude_max or 10, RAND_AUGMENT_MAX_MAGNITUDE)
    return transform


# ---------------------------------------------------------------------------------------------------- batches


def undecoded_columns(
    dataset: AnyDataset, image_column: str, label_column: str | None = None, id_column: str | None = None
) -> AnyDataset:
    """Only the columns a `DecodingCollator` with the same column names reads, the images left encoded
    (`{"bytes", "path"}`) for it to decode. ValueError if the label column's type is not integer class ids."""
    if label_column is not None:
        _check_label_feature(dataset, label_column)
    columns = [column for column in (image_column, label_column, id_column) if column is not None]
    dataset = dataset.select_columns(list(dict.fromkeys(columns)))
    if isinstance((dataset.features or {}).get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


@dataclass(frozen=True)
class DecodingCollator:
    """The DataLoader's `collate_fn`: decode, transform and stack rows of `undecoded_columns` into a batch
    `{"pixel_values", "labels", "example_ids"}` (the last two where their columns are named).

    Run after the data is split between processes, it decodes each image once, in the process that uses it. An image
    that fails to decode is counted (`num_decode_failures`) and, with `failed_images="drop"`, left out; with
    `"blank"` it stays, as zeros labelled `IGNORED_LABEL`, for loops whose processes gather equal-sized batches.
    Returns None when every image of the batch failed: the loop must skip the batch. A label that is not a class
    id >= 0 raises ValueError. A dataclass, so that DataLoader workers can be spawned (it pickles).
    """

    transform: Transform
    image_column: str
    label_column: str | None = None
    id_column: str | None = None
    failed_images: Literal["drop", "blank"] = "drop"

    def __post_init__(self):
        if self.failed_images not in ("drop", "blank"):
            raise ValueError(f"failed_images={self.failed_images!r}: pass 'drop' or 'blank'.")
        if self.failed_images == "blank" and self.label_column is None:
            raise ValueError("failed_images='blank' marks a failed image by its label: name the label_column.")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        pixel_values = [self._pixel_values(row) for row in rows]
        decoded = next((values for values in pixel_values if values is not None), None)
        if decoded is None:
            return None
        labels = None
        if self.label_column is not None:
            labels = [_class_id(row[self.label_column], self.label_column) for row in rows]
        if self.failed_images == "blank":
            labels = [IGNORED_LABEL if values is None else label for values, label in zip(pixel_values, labels)]
            pixel_values = [torch.zeros_like(decoded) if values is None else values for values in pixel_values]
        kept = [index for index, values in enumerate(pixel_values) if values is not None]
        batch: dict[str, Any] = {"pixel_values": torch.stack([pixel_values[index] for index in kept])}
        if labels is not None:
            batch["labels"] = torch.tensor([labels[index] for index in kept], dtype=torch.long)
        if self.id_column is not None:
            ids = [rows[index][self.id_column] for index in kept]
            batch["example_ids"] = ids if isinstance(ids[0], str) else torch.tensor(ids)
        return batch

    def _pixel_values(self, row: dict[str, Any]) -> torch.Tensor | None:
        image = decode_image(row[self.image_column])
        return None if image is None else self.transform(image)


def _class_id(value: Any, column: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise InputError(
        f"Label column {column!r} holds {value!r}, which is not an integer class id >= 0 "
        "(unlabelled splits such as ImageNet's test split use -1): use a labelled split or another label column."
    )


def _check_label_feature(dataset: AnyDataset, column: str) -> None:
    feature = (dataset.features or {}).get(column)
    if feature is None or isinstance(feature, datasets.ClassLabel):
        return
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise InputError(
            f"Label column {column!r} has type {feature}, not integer class ids: cast it to a ClassLabel "
            "(dataset.class_encode_column) or pick another label column (--label_column_name)."
        )


# ---------------------------------------------------------------------------------------------------- labelled splits


EVAL_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")


@dataclass
class LabelledSplits:
    """The training and evaluation rows of an image classification data set, checked, in `undecoded_columns` form;
    `None` for a split that is not used."""

    train: AnyDataset | None
    eval: AnyDataset | None
    image_column: str
    label_column: str
    class_names: list[str]
    num_train_examples: int | None  # None: a stream of unknown size
    num_eval_examples: int | None
    eval_source: DataSource | None = None  # where the evaluation split comes from, and its name (for model cards)
    eval_split: str | None = None


def load_labelled_splits(source: DataSource, data_args: Any, do_train: bool, do_eval: bool,
                         seed: int) -> LabelledSplits:
    """The splits that `do_train` / `do_eval` need, cut to `--max_train_samples` / `--max_eval_samples` (a seeded
    random subset of map-style training data, else the first examples) and checked: both hold the image and label
    columns, labels are class ids of the same classes, no split is empty. `data_args` holds the Trainer scripts' data
    flags (`classification.DataTrainingArguments`).

    The evaluation split is `--eval_split_name`, else the first of `EVAL_SPLIT_CANDIDATES` in the source (or in
    `--validation_dir`, or that folder's only split), else `--train_val_split` of the training split, held out before
    either is cut (map-style data only). Raises `InputError` for bad data."""
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(data_args, flag) is not None and getattr(data_args, flag) <= 0:
            raise InputError(f"--{flag} {getattr(data_args, flag)} leaves no examples: pass a positive number.")
    train = eval_ = num_train = num_eval = eval_source = eval_split = None
    if do_eval:
        eval_source = source if data_args.validation_dir is None else DataSource(
            train_dir=data_args.validation_dir, token=source.token, cache_dir=source.cache_dir)
        eval_split = _eval_split_name(eval_source, data_args.eval_split_name, data_args.validation_dir is not None)
        if eval_split is not None:
            eval_, num_eval = open_split(eval_source, eval_split, data_args.streaming, data_args.max_eval_samples,
                                         count_stream=True)
        elif data_args.streaming:
            raise InputError(f"{source.name} has no evaluation split (none of {', '.join(EVAL_SPLIT_CANDIDATES)}): "
                             "pass --eval_split_name or --validation_dir (a stream cannot be split by "
                             "--train_val_split).")
    if do_eval and eval_ is None:
        full, _ = open_split(source, data_args.train_split_name, streaming=False)
        held_out = full.train_test_split(test_size=data_args.train_val_split, seed=seed)
        eval_ = _first(held_out["test"], data_args.max_eval_samples)  # both parts are shuffled already
        train = _first(held_out["train"], data_args.max_train_samples) if do_train else None
        num_eval, num_train = len(eval_), None if train is None else len(train)
        eval_split = f"{data_args.train_split_name} ({data_args.train_val_split:.0%} held out)"
    elif do_train:
        train, num_train = open_split(source, data_args.train_split_name, data_args.streaming,
                                      data_args.max_train_samples, shuffle_seed=seed,
                                      num_examples=data_args.num_train_examples)

    splits = {what: dataset for what, dataset in (("training split", train), ("evaluation split", eval_))
              if dataset is not None}
    first = next(iter(splits.values()))
    image_column = find_image_column(first, data_args.image_column_name)
    label_column = find_label_column(first, data_args.label_column_name)
    for dataset in splits.values():
        find_image_column(dataset, image_column)
        find_label_column(dataset, label_column)
    class_names = _class_names(splits, label_column)
    for what, dataset in splits.items():
        _check_class_ids(dataset, label_column, len(class_names), what)

    train, eval_ = (None if dataset is None else undecoded_columns(dataset, image_column, label_column)
                    for dataset in (train, eval_))
    if isinstance(train, datasets.IterableDataset) and data_args.shuffle_buffer_size > 0:
        train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    return LabelledSplits(train, eval_, image_column, label_column, class_names, num_train, num_eval, eval_source,
                          eval_split)


def _eval_split_name(source: DataSource, requested: str | None, is_validation_folder: bool) -> str | None:
    if requested is not None:
        return requested
    available = source.splits()
    found = next((name for name in EVAL_SPLIT_CANDIDATES if name in available), None)
    if found is None and is_validation_folder and len(available) == 1:
        return available[0]  # a folder without split names is one split, here all of it evaluation data
    return found


def _first(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def _class_names(splits: dict[str, AnyDataset], label_column: str) -> list[str]:
    """The ClassLabel names the splits agree on; for plain integer labels, "0" .. the largest label."""
    names = [_class_label_names(dataset, label_column, what) for what, dataset in splits.items()]
    known = [split_names for split_names in names if split_names is not None]
    if len(known) == 2 and known[0] != known[1]:
        raise InputError(
            f"The training and evaluation splits name different classes ({len(known[0])}: {known[0][:5]}... vs "
            f"{len(known[1])}: {known[1][:5]}...): pick splits of the same data set (--eval_split_name, "
            "--validation_dir)."
        )
    if known:
        return known[0]
    count = max(_label_range(dataset, label_column)[1] for dataset in splits.values()) + 1
    return [str(index) for index in range(count)]


def _class_label_names(dataset: AnyDataset, label_column: str, what: str) -> list[str] | None:
    """ClassLabel names; None for a plain integer column (the class count comes from its values)."""
    _check_label_feature(dataset, label_column)
    feature = (dataset.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(dataset, datasets.IterableDataset):
        raise InputError(
            f"Label column {label_column!r} of the streamed {what} holds plain integers, not a ClassLabel: counting "
            "the classes would need a pass over the whole stream. Cast it to a ClassLabel or drop --streaming."
        )
    return None


def _label_range(dataset: AnyDataset, label_column: str) -> tuple[int, int]:
    if isinstance(dataset, datasets.IterableDataset):
        # A stream is checked on its first example; its ClassLabel guarantees the rest are class ids or -1, and
        # `DecodingCollator` refuses a -1 when it meets one.
        value = next(iter(dataset.select_columns([label_column])))[label_column]
        return value, value
    values = dataset.select_columns([label_column]).with_format("numpy")[:][label_column]
    return int(values.min()), int(values.max())


def _check_class_ids(dataset: AnyDataset, label_column: str, num_classes: int, what: str) -> None:
    low, high = _label_range(dataset, label_column)
    if low < 0 or high >= num_classes:
        raise InputError(
            f"Label column {label_column!r} of the {what} holds {low if low < 0 else high}, not a class id in "
            f"[0, {num_classes}) (unlabelled splits such as ImageNet's test split use -1): use a labelled split "
            "(--train_split_name / --eval_split_name) or another --label_column_name."
        )
