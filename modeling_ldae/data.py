"""Image data sets, decoding and transforms shared by the pre-training, linear-probe and fine-tune scripts.

Pipeline: `load_image_dataset` -> `find_image_column` / `find_label_column` -> `prepare_dataset(dataset,
<one of the *_transform functions>, ...)` -> `torch.utils.data.DataLoader(..., collate_fn=collate_images)`.

Images are decoded here rather than by `datasets`, so that one corrupt file costs one example, not the run:
a failure yields `pixel_values=None`, is counted (`num_decode_failures()`), logged, and dropped by
`collate_images`. `collate_images` returns `None` for a batch in which every image failed; training loops must
skip `None` batches (the transformers Trainer cannot: keep its batches large enough for that never to happen).
The failure count is per process (each rank counts its own).

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
from typing import Any

import datasets
import numpy as np
import PIL.Image
import timm.data
import torch
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from torchvision.transforms import v2
from transformers import ConvNextImageProcessor
from transformers.image_utils import PILImageResampling

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset
Transform = Callable[[PIL.Image.Image], torch.Tensor]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls")
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)
# ConvNextImageProcessor crops only below this size; from it on it warps to (size, size).
CONVNEXT_CROP_BELOW = 384

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
    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            "Pass exactly one of dataset_name (a Hub id or a local data set folder) and train_dir "
            f"(a local folder of images or parquet/arrow shards); got dataset_name={dataset_name!r}, "
            f"train_dir={train_dir!r}."
        )
    if train_dir is not None:
        builder_kwargs = _folder_builder_kwargs(Path(train_dir).expanduser())
        source = str(train_dir)
    else:
        if dataset_name.startswith(("/", ".", "~")) and not Path(dataset_name).expanduser().is_dir():
            raise ValueError(f"dataset_name {dataset_name!r} looks like a local path but is not a folder: fix it.")
        builder_kwargs = {"path": dataset_name, "name": dataset_config_name}
        source = dataset_name
    builder = datasets.load_dataset_builder(**builder_kwargs, token=token, cache_dir=cache_dir)

    # datasets words this error differently for map-style and streaming sets, and only after preparing every split.
    available = [str(name) for name in (builder.config.data_files or builder.info.splits or {})]
    missing = [name for name in _split_names(split) if available and name not in available]
    if missing:
        raise ValueError(
            f"Split {missing[0]!r} not found in {source}; available splits: {', '.join(available)}. "
            "Pass one of these as split."
        )
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


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


def make_image_processor(image_size: int, crop_pct: float = 0.875) -> ConvNextImageProcessor:
    """The image processor saved with checkpoints; `eval_transform` reproduces it."""
    return ConvNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_pct=crop_pct,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(NORMALIZE_MEAN),
        image_std=list(NORMALIZE_STD),
    )


def probe_train_transform(image_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> Transform:
    """MAE linear-probe training augmentation: random resized crop + horizontal flip."""
    return pretrain_transform(image_size, random_resized_crop=True, scale=scale)


def finetune_train_transform(
    image_size: int, rand_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25
) -> Transform:
    """MAE fine-tune augmentation (timm): random resized crop, flip, RandAugment, random erasing (pixel mode)."""
    return timm.data.create_transform(
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


# ---------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class _ExamplePreparer:
    """Turns raw rows into model examples; a picklable class so DataLoader workers can be spawned."""

    transform: Transform
    image_column: str
    label_column: str | None
    index_column: str | None

    def example(self, row: dict[str, Any]) -> dict[str, Any]:
        image = decode_image(row[self.image_column])
        example: dict[str, Any] = {"pixel_values": None if image is None else self.transform(image)}
        if self.label_column is not None:
            example["labels"] = _class_id(row[self.label_column], self.label_column)
        if self.index_column is not None:
            example["example_id"] = row[self.index_column]
        return example

    def batch(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples = [self.example(row) for row in rows]
        return {key: [example[key] for example in examples] for key in self._output_keys()}

    def _output_keys(self) -> list[str]:
        keys = ["pixel_values"]
        if self.label_column is not None:
            keys.append("labels")
        if self.index_column is not None:
            keys.append("example_id")
        return keys


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


def prepare_dataset(
    dataset: AnyDataset,
    transform: Transform,
    image_column: str,
    label_column: str | None = None,
    index_column: str | None = None,
) -> AnyDataset:
    """Yield examples `{"pixel_values": tensor | None, "labels": int, "example_id": ...}` (last two if asked).

    Map-style sets are transformed lazily, per accessed batch. `index_column` names a column holding a stable
    example id; a map-style set without it gets the row index there.
    """
    if isinstance((dataset.features or {}).get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if label_column is not None:
        _check_label_feature(dataset, label_column)
    columns = _column_names(dataset)
    if index_column is not None and index_column not in columns:
        if isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"index_column {index_column!r} not found; the streamed data set has columns {columns}: "
                "a stream has no stable row index, so name an existing id column."
            )
        dataset = dataset.add_column(index_column, np.arange(len(dataset)))
    preparer = _ExamplePreparer(transform, image_column, label_column, index_column)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(preparer.example, remove_columns=columns)
    return dataset.with_transform(preparer.batch)


def collate_images(examples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Stack examples into a batch, dropping those whose image failed to decode.

    Returns None when every image of the batch failed: the training loop must skip such batches.
    """
    kept = [example for example in examples if example["pixel_values"] is not None]
    if not kept:
        return None
    batch: dict[str, Any] = {"pixel_values": torch.stack([example["pixel_values"] for example in kept])}
    if "labels" in kept[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in kept], dtype=torch.long)
    if "example_id" in kept[0]:
        ids = [example["example_id"] for example in kept]
        batch["example_ids"] = ids if isinstance(ids[0], str) else torch.tensor(ids)
    return batch
