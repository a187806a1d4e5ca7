"""Data loading, decoding, transforms and collation (modeling_ldae/data.py) on real CIFAR-10 images, offline."""

import io
import logging
import multiprocessing
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modeling_ldae import data

IMAGE_SIZE = 48


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private cache so the suite neither depends on nor fills the user's datasets cache."""
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="session")
def cifar_test(cifar10_dir: Path, datasets_cache: str) -> datasets.Dataset:
    return data.load_image_dataset(str(cifar10_dir), split="test", cache_dir=datasets_cache)


@pytest.fixture(scope="session")
def cifar_images(cifar_test: datasets.Dataset) -> list[PIL.Image.Image]:
    return [cifar_test[i]["img"].convert("RGB") for i in range(6)]


def _batches(rows, collator: data.DecodingCollator, batch_size: int = 4, num_workers: int = 0) -> list[dict | None]:
    return list(torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=collator, num_workers=num_workers))


def _assert_model_input(pixel_values: torch.Tensor, size: int = IMAGE_SIZE) -> None:
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape[-3:] == (3, size, size)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert pixel_values.std() > 0.05  # a real image, not a constant fill


# ---------------------------------------------------------------------------------------------------- loading


def test_cifar_map_style_decodes_lazily_with_ids(cifar_test: datasets.Dataset) -> None:
    assert isinstance(cifar_test, datasets.Dataset) and len(cifar_test) == 10_000
    image_column, label_column = data.find_image_column(cifar_test), data.find_label_column(cifar_test)
    assert (image_column, label_column) == ("img", "label")
    assert data.undecoded_columns(cifar_test, image_column).column_names == ["img"]

    with_ids = cifar_test.add_column("example_id", np.arange(len(cifar_test)))
    rows = data.undecoded_columns(with_ids, image_column, label_column, id_column="example_id")
    assert rows.column_names == ["img", "label", "example_id"] and len(rows) == len(cifar_test)
    # Lazy: the raw image stays encoded in the Arrow table until the collator decodes it.
    assert rows.features["img"] == datasets.Image(decode=False) and isinstance(rows[7]["img"]["bytes"], bytes)

    collator = data.DecodingCollator(data.pretrain_transform(IMAGE_SIZE), image_column, label_column, "example_id")
    example = collator([rows[7]])
    _assert_model_input(example["pixel_values"])
    assert example["labels"].tolist() == [cifar_test[7]["label"]] and example["example_ids"].tolist() == [7]

    batch = _batches(rows.select(range(10)), collator)[-1]
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].dtype == torch.long
    assert batch["example_ids"].tolist() == [8, 9]


def test_cifar_streaming_matches_map_style(cifar10_dir: Path, cifar_test: datasets.Dataset) -> None:
    stream = data.load_image_dataset(str(cifar10_dir), split="test", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert data.find_image_column(stream) == "img" and data.find_label_column(stream) == "label"

    rows = data.undecoded_columns(stream.take(8), "img", "label")
    batches = _batches(rows, data.DecodingCollator(data.eval_transform(IMAGE_SIZE), "img", "label"))
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, 3, IMAGE_SIZE, IMAGE_SIZE)] * 2
    _assert_model_input(batches[0]["pixel_values"])
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == cifar_test[:8]["label"]
    reference = data.eval_transform(IMAGE_SIZE)(cifar_test[0]["img"].convert("RGB"))
    torch.testing.assert_close(batches[0]["pixel_values"][0], reference)


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_split_lists_available_splits(cifar10_dir: Path, datasets_cache: str, streaming: bool) -> None:
    assert data.available_splits(str(cifar10_dir), cache_dir=datasets_cache) == ["train", "test"]
    with pytest.raises(ValueError, match=r"'validation' not found.*available splits: train, test"):
        data.load_image_dataset(str(cifar10_dir), split="validation", streaming=streaming, cache_dir=datasets_cache)


def test_source_argument_errors(tmp_path: Path, cifar10_dir: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        data.load_image_dataset()
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        data.load_image_dataset(str(cifar10_dir), train_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        data.available_splits()
    with pytest.raises(ValueError, match="does not exist"):
        data.load_image_dataset(train_dir=tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files .* and no .parquet/.arrow shards"):
        data.load_image_dataset(train_dir=tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        data.load_image_dataset(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory, cifar_test: datasets.Dataset) -> Path:
    folder = tmp_path_factory.mktemp("parquet_shards")
    cifar_test.select(range(200)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    cifar_test.select(range(200, 300)).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    cifar_test.select(range(300, 350)).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    (folder / "dataset_info.json").write_text("{}")  # stray non-shard file must be ignored
    return folder


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_train_dir(parquet_dir: Path, datasets_cache: str, streaming: bool) -> None:
    dataset = data.load_image_dataset(train_dir=parquet_dir, streaming=streaming, cache_dir=datasets_cache)
    assert isinstance(dataset, datasets.IterableDataset if streaming else datasets.Dataset)
    assert isinstance(dataset.features["img"], datasets.Image)
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    rows = data.undecoded_columns(dataset, "img", "label")
    if streaming:
        assert dataset.n_shards == 2
        assert sum(1 for _ in dataset) == 300
    else:
        assert len(dataset) == 300
    first = data.DecodingCollator(data.pretrain_transform(IMAGE_SIZE), "img", "label")([next(iter(rows))])
    _assert_model_input(first["pixel_values"])
    assert first["labels"].tolist() == [next(iter(dataset))["label"]]


def test_parquet_train_dir_splits_follow_file_names(parquet_dir: Path, datasets_cache: str) -> None:
    assert data.available_splits(train_dir=parquet_dir, cache_dir=datasets_cache) == ["train", "test"]
    test_split = data.load_image_dataset(train_dir=parquet_dir, split="test", cache_dir=datasets_cache)
    assert len(test_split) == 50
    with pytest.raises(ValueError, match="available splits: train, test"):
        data.load_image_dataset(train_dir=parquet_dir, split="validation", streaming=True)


# ---------------------------------------------------------------------------------------------------- images


def _jpeg_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory, cifar_images: list[PIL.Image.Image]) -> Path:
    """Two class folders of PNG and JPEG images, plus one truncated JPEG."""
    folder = tmp_path_factory.mktemp("image_folder")
    for class_name, images in (("cat", cifar_images[:3]), ("ship", cifar_images[3:])):
        (folder / class_name).mkdir()
        for i, image in enumerate(images):
            image.save(folder / class_name / f"{i}.{'png' if i % 2 else 'jpg'}")
    jpeg = _jpeg_bytes(cifar_images[0].resize((64, 64)))
    (folder / "cat" / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return folder


@pytest.mark.parametrize(("streaming", "num_workers"), [(False, 0), (True, 0), (False, 1)])
def test_image_folder_skips_corrupt_jpeg(
    image_dir: Path, datasets_cache: str, streaming: bool, num_workers: int
) -> None:
    assert data.available_splits(train_dir=image_dir) == ["train"]  # a folder without split names is one split
    dataset = data.load_image_dataset(train_dir=image_dir, streaming=streaming, cache_dir=datasets_cache)
    assert dataset.features["label"].names == ["cat", "ship"]
    image_column, label_column = data.find_image_column(dataset), data.find_label_column(dataset)
    rows = data.undecoded_columns(dataset, image_column, label_column)
    collator = data.DecodingCollator(data.eval_transform(IMAGE_SIZE), image_column, label_column)

    failures_before = data.num_decode_failures()
    # Failures inside a forked DataLoader worker must still reach this process's counter.
    batches = _batches(rows, collator, batch_size=7, num_workers=num_workers)
    assert data.num_decode_failures() == failures_before + 1

    assert len(batches) == 1  # the whole folder fits one batch
    batch = batches[0]
    assert batch["pixel_values"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    _assert_model_input(batch["pixel_values"])
    assert sorted(batch["labels"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_decode_failures_are_logged_with_their_file_first_ten_then_every_thousandth(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fresh counter: the suite's earlier failures must not decide which of these are logged.
    monkeypatch.setattr(data, "_decode_failures", multiprocessing.Value("q", 0))
    corrupt = {"bytes": None, "path": str(image_dir / "cat" / "corrupt.jpg")}
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        assert all(data.decode_image(corrupt) is None for _ in range(11))
        assert [record.getMessage().count("corrupt.jpg") for record in caplog.records] == [1] * 10
        data._decode_failures.value = 998
        data.decode_image(corrupt), data.decode_image(corrupt)
    assert len(caplog.records) == 11 and "(1000 so far)" in caplog.records[-1].getMessage()
    assert data.num_decode_failures() == 1000


def test_decode_image_handles_bytes_modes_and_garbage(cifar_images: list[PIL.Image.Image]) -> None:
    gray = cifar_images[0].convert("L")
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    decoded = data.decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.mode == "RGB" and decoded.size == gray.size
    assert data.decode_image(_jpeg_bytes(cifar_images[1])).mode == "RGB"

    failures_before = data.num_decode_failures()
    assert data.decode_image(b"definitely not an image") is None
    assert data.decode_image({"bytes": None, "path": "/nonexistent/image.jpg"}) is None
    assert data.num_decode_failures() == failures_before + 2


def test_collator_drops_or_blanks_failed_images_and_returns_none_when_all_failed(
    cifar_images: list[PIL.Image.Image],
) -> None:
    garbage = {"bytes": b"not an image", "path": None}
    images = [{"bytes": _jpeg_bytes(image), "path": None} for image in cifar_images[:2]]
    rows = [{"img": images[0], "label": 1, "id": 10}, {"img": garbage, "label": 2, "id": 11},
            {"img": images[1], "label": 3, "id": 12}]
    transform = data.eval_transform(IMAGE_SIZE)

    failures_before = data.num_decode_failures()
    dropped = data.DecodingCollator(transform, "img", "label", "id")(rows)
    assert data.num_decode_failures() == failures_before + 1
    assert dropped["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert dropped["labels"].tolist() == [1, 3] and dropped["labels"].dtype == torch.long
    assert dropped["example_ids"].tolist() == [10, 12]

    blanked = data.DecodingCollator(transform, "img", "label", "id", failed_images="blank")(rows)
    assert blanked["labels"].tolist() == [1, data.IGNORED_LABEL, 3] and blanked["example_ids"].tolist() == [10, 11, 12]
    torch.testing.assert_close(blanked["pixel_values"][[0, 2]], dropped["pixel_values"])
    assert not blanked["pixel_values"][1].any()

    assert set(data.DecodingCollator(transform, "img")(rows)) == {"pixel_values"}
    named = data.DecodingCollator(transform, "img", id_column="id")([{**row, "id": f"n{row['id']}"} for row in rows])
    assert named["example_ids"] == ["n10", "n12"]  # string ids stay a list
    for failed_images in ("drop", "blank"):
        assert data.DecodingCollator(transform, "img", "label", failed_images=failed_images)([rows[1]]) is None


def test_collator_arguments_are_checked() -> None:
    transform = data.eval_transform(IMAGE_SIZE)
    with pytest.raises(ValueError, match="failed_images='blank' marks a failed image by its label"):
        data.DecodingCollator(transform, "img", failed_images="blank")
    with pytest.raises(ValueError, match="failed_images='skip': pass 'drop' or 'blank'"):
        data.DecodingCollator(transform, "img", "label", failed_images="skip")


# ---------------------------------------------------------------------------------------------------- columns


def test_column_detection_and_errors(cifar_test: datasets.Dataset) -> None:
    small = cifar_test.select(range(4))
    renamed = small.rename_columns({"img": "jpg", "label": "cls"})
    assert data.find_image_column(renamed) == "jpg" and data.find_label_column(renamed) == "cls"

    unknown = small.rename_columns({"img": "picture", "label": "target"})
    with pytest.raises(ValueError, match=r"No image column .*columns \['picture', 'target'\]"):
        data.find_image_column(unknown)
    with pytest.raises(ValueError, match=r"No label column .*columns \['picture', 'target'\]"):
        data.find_label_column(unknown)
    assert data.find_image_column(unknown, "picture") == "picture"
    with pytest.raises(ValueError, match=r"'photo' not found.*\['picture', 'target'\]"):
        data.find_image_column(unknown, "photo")

    # After a map a stream no longer knows its schema: the first example is read instead.
    stream = renamed.to_iterable_dataset().map(lambda example: example)
    assert stream.features is None
    assert data.find_image_column(stream) == "jpg" and data.find_label_column(stream) == "cls"


@pytest.mark.floor
def test_non_integer_labels_raise(cifar_test: datasets.Dataset) -> None:
    small = cifar_test.select(range(4)).remove_columns("label")
    names = small.add_column("label", ["cat", "ship", "cat", "frog"])
    with pytest.raises(ValueError, match="Label column 'label' has type"):
        data.undecoded_columns(names, "img", "label")
    collator = data.DecodingCollator(data.eval_transform(IMAGE_SIZE), "img", "label")

    unlabelled = data.undecoded_columns(small.add_column("label", [-1] * 4), "img", "label")
    with pytest.raises(ValueError, match="Label column 'label' holds -1"):
        collator([unlabelled[0]])

    # A mapped stream no longer knows its schema: the collator checks each value.
    floats = data.undecoded_columns(small.to_iterable_dataset().map(lambda example: {"label": 2.5}), "img", "label")
    with pytest.raises(ValueError, match="Label column 'label' holds 2.5"):
        collator([next(iter(floats))])


# ---------------------------------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def wide_image(cifar_images: list[PIL.Image.Image]) -> PIL.Image.Image:
    return cifar_images[2].resize((91, 64), PIL.Image.BICUBIC)


@pytest.mark.parametrize(
    "make_transform",
    [
        lambda size: data.pretrain_transform(size),
        lambda size: data.pretrain_transform(size, random_resized_crop=True),
        lambda size: data.probe_train_transform(size),
        lambda size: data.eval_transform(size),
    ],
    ids=["pretrain_center_crop", "pretrain_random_resized_crop", "probe_train", "eval"],
)
def test_transforms_output_range_and_shape(make_transform, wide_image: PIL.Image.Image) -> None:
    torch.manual_seed(0)
    for size in (IMAGE_SIZE, 80):  # downscaling and upscaling (bicubic overshoot must be clamped)
        _assert_model_input(make_transform(size)(wide_image), size)


def test_pretrain_default_is_deterministic_center_crop(wide_image: PIL.Image.Image) -> None:
    transform = data.pretrain_transform(IMAGE_SIZE)
    torch.testing.assert_close(transform(wide_image), transform(wide_image))
    flipped = data.pretrain_transform(IMAGE_SIZE, random_resized_crop=True)
    torch.manual_seed(0)
    outputs = [flipped(wide_image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("image_size", [224, 384])
def test_eval_transform_matches_image_processor(image_size: int, cifar_images: list[PIL.Image.Image]) -> None:
    # Non-square sources give odd crop margins, where floor and round offsets would differ.
    sizes = [(64, 64), (97, 80), (80, 131)]
    sources = [image.resize(size, PIL.Image.BICUBIC) for image, size in zip(cifar_images, sizes)]
    processor = data.make_image_processor(image_size)
    expected = processor(sources, return_tensors="pt")["pixel_values"]
    actual = torch.stack([data.eval_transform(image_size)(image) for image in sources])
    assert actual.shape == expected.shape == (3, 3, image_size, image_size)
    assert (actual - expected).abs().max() < 0.05
    assert (actual - expected).abs().mean() < 1e-3


def test_finetune_transform_augments(wide_image: PIL.Image.Image) -> None:
    transform = data.finetune_train_transform(IMAGE_SIZE)

    def run(seed: int) -> torch.Tensor:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return transform(wide_image)

    first = run(0)
    assert first.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and first.dtype == torch.float32
    torch.testing.assert_close(run(0), first)
    assert not torch.allclose(run(1), first)


def test_finetune_transform_survives_the_strongest_rand_augment(wide_image: PIL.Image.Image) -> None:
    # Every op at magnitude 10, no noise: uncapped, timm's posterize would keep 0 bits, which Pillow rejects.
    transform = data.finetune_train_transform(IMAGE_SIZE, rand_augment="rand-m10-mstd0-inc1")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(200):
        assert transform(wide_image).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------------- labelled splits


def _data_flags(**flags):
    from modeling_ldae.classification import DataTrainingArguments

    return DataTrainingArguments(**flags)


@pytest.fixture(scope="module")
def train_only_dir(tmp_path_factory: pytest.TempPathFactory, parquet_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("train_only")
    shutil.copy(parquet_dir / "train-00000-of-00002.parquet", folder / "train-00000-of-00001.parquet")
    return folder


def test_labelled_splits_hold_out_evaluation_before_cutting_the_training_split(
    train_only_dir: Path, datasets_cache: str
) -> None:
    source = data.DataSource(train_dir=str(train_only_dir), cache_dir=datasets_cache)
    flags = _data_flags(train_dir=str(train_only_dir), train_val_split=0.25, max_train_samples=100)
    splits = data.load_labelled_splits(source, flags, do_train=True, do_eval=True, seed=0)
    assert (splits.num_train_examples, splits.num_eval_examples) == (100, 50)  # 150 + 50 of 200, then 100 of 150
    assert (len(splits.train), len(splits.eval)) == (100, 50)
    train_images = {row["img"]["bytes"] for row in splits.train}
    assert len(train_images) == 100 and not train_images & {row["img"]["bytes"] for row in splits.eval}
    assert splits.class_names[:2] == ["airplane", "automobile"] and len(splits.class_names) == 10
    assert (splits.image_column, splits.label_column) == ("img", "label")


def test_labelled_splits_evaluate_a_validation_folder_without_split_names(
    parquet_dir: Path, train_only_dir: Path, datasets_cache: str
) -> None:
    source = data.DataSource(train_dir=str(parquet_dir), cache_dir=datasets_cache)
    flags = _data_flags(train_dir=str(parquet_dir), validation_dir=str(train_only_dir), max_eval_samples=20)
    splits = data.load_labelled_splits(source, flags, do_train=False, do_eval=True, seed=0)
    assert splits.train is None and splits.num_eval_examples == 20
    first = pq.read_table(train_only_dir / "train-00000-of-00001.parquet").slice(0, 1).to_pylist()[0]
    assert splits.eval[0]["img"]["bytes"] == first["img"]["bytes"]  # the folder's only split, first examples


def test_streamed_split_is_checked_and_counted_without_decoding(
    cifar_test: datasets.Dataset, tmp_path: Path, datasets_cache: str
) -> None:
    # A corrupt first image must cost one example when the collator meets it, not fail the emptiness check or count.
    folder = tmp_path / "corrupt_first"
    folder.mkdir()
    table = cifar_test.select(range(12)).with_format("arrow")[:]
    rows = table.to_pylist()
    rows[0]["img"] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), folder / "test-00000-of-00001.parquet")
    source = data.DataSource(train_dir=str(folder), cache_dir=datasets_cache)
    stream, count = data.open_split(source, "test", streaming=True, count_stream=True)
    assert count == 12 and isinstance(stream, datasets.IterableDataset)
    flags = _data_flags(train_dir=str(folder), eval_split_name="test", streaming=True)
    splits = data.load_labelled_splits(source, flags, do_train=False, do_eval=True, seed=0)
    assert splits.num_eval_examples == 12 and splits.class_names[0] == "airplane"
