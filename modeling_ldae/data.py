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
        raise ValueError(
            f"Split {missing[0]!r} not found in {train_dir if train_dir is not None else dataset_name}; available "
            f"splits: {', '.join(available)}. Pass one of these as split."
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
        raise ValueError(
            "Pass exactly one of dataset_name (a Hub id or a local data set folder) and train_dir "
            f"(a local folder of images or parquet/arrow shards); got dataset_name={dataset_name!r}, "
            f"train_dir={train_dir!r}."
        )
    if train_dir is not None:
        builder_kwargs = _folder_builder_kwargs(Path(train_dir).expanduser())
    else:
        if dataset_name.startswith(("/", ".", "~")) and not Path(dataset_name).expanduser().is_dir():
            raise ValueError(f"dataset_name {dataset_name!r} looks like a local path but is not a folder: fix it.")
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
        raise ValueError(
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
    raise ValueError(
        f"train_dir {folder} contains no image files (.jpg, .png, ...) and no .parquet/.arrow shards: "
        "point it at the folder that holds them."
    )


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
            raise ValueError(f"{kind} column {requested!r} not found; the data set has columns {columns}.")
        return requested
    found = next((name for name in candidates if name in columns), None)
    if found is None:
        raise ValueError(
            f"No {kind} column found among {list(candidates)}; the data set has columns {columns}: "
            f"name the {kind} column explicitly."
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
        return _IMAGE_DECODER.decode_example(value).convert("RGB")
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
    raise ValueError(
        f"Label column {column!r} holds {value!r}, which is not an integer class id >= 0 "
        "(unlabelled splits such as ImageNet's test split use -1): use a labelled split or another label column."
    )


def _check_label_feature(dataset: AnyDataset, column: str) -> None:
    feature = (dataset.features or {}).get(column)
    if feature is None or isinstance(feature, datasets.ClassLabel):
        return
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(
            f"Label column {column!r} has type {feature}, not integer class ids: cast it to a ClassLabel "
            "(dataset.class_encode_column) or pick another label column."
        )
