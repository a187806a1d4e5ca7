"""Pre-training loop for l-DAE (and any `AutoModelForPreTraining` whose forward returns a loss), on Accelerate.

`run_pretrain.py` parses its argument dataclasses and calls `Pretrainer(model_args, data_args, training_args).train()`.
Everything a run does lives here, in order:

1. setup (`Pretrainer.__init__`): every check of the user's input runs before any work and raises `ValueError`
   with one line saying what to change; data sets are opened, the model is built, the resume checkpoint is checked;
2. stage 1 (`fit_pca`, l-DAE only): the patch-wise PCA on a random sample of center-cropped training images, each
   process reading its own share, float64 sums added across processes;
3. stage 2 (`train`): the optimisation loop with health signals, checkpoints (atomic, last K kept, resume with the
   data position), SIGTERM/SIGINT handling and a stop on non-finite loss;
4. the final model: `save_pretrained` + image processor + model card, moved into `output_dir`; optional Hub upload.

Data: examples travel undecoded (`data.undecoded_columns`) until the collate function (`data.DecodingCollator`), which
runs after Accelerate split the data between processes, so each process decodes only its own share, once, whichever
way Accelerate shards (by files when a stream has at least as many shards as processes, else by batches of a stream
every process reads).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, GradientAccumulationPlugin, gather_object, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForPreTraining, get_cosine_schedule_with_warmup

from . import data as ldae_data
from . import hub
from .configuration_ldae import LDAEConfig
from .knn import knn_top1
from .modeling_ldae import LDAEForPreTraining, LDAEModel, patchify, timestep_to_sigma, unpatchify
from .optim import adamw_param_groups, steps_from_epochs
from .pca import PatchPCAAccumulator, explained_variance_ratio

logger = get_logger(__name__)  # main process only

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
DEFAULT_DATASET = "ILSVRC/imagenet-1k"
MONITOR_SPLITS = ("validation", "test")
NUM_NOISE_BINS = 4


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


# ---------------------------------------------------------------------------------------------------- data


def _worker_init(process_index: int, worker_id: int):
    # A pre-emption signal reaches the whole process group: workers must outlive the main process's checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Torch seeds workers alike on every process; offset by rank so augmentations differ between processes.
    seed = (torch.initial_seed() + 1_000_003 * process_index) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _first_rows(dataset, count: int) -> list[dict[str, Any]]:
    if isinstance(dataset, datasets.IterableDataset):
        return list(dataset.take(count))
    return list(dataset.select(range(min(count, len(dataset)))))


# ---------------------------------------------------------------------------------------------------- trackers


class JSONLinesTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per `log` call to `<logging_dir>/metrics.jsonl` (main process):
    readable while the run goes, with no tracking service."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records `JSONLinesTracker` wrote for a run."""
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------------- models


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """`"hidden_size=64,num_hidden_layers=2,qkv_bias=false"` -> dict (JSON values, else strings), as in the
    `transformers` examples' `--config_overrides`."""
    if not overrides:
        return {}
    parsed = {}
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: {item!r} is not key=value; write e.g. 'hidden_size=64,patch_size=8'.")
        value = value.strip()
        try:
            parsed[key.strip()] = json.loads({"True": "true", "False": "false", "None": "null"}.get(value, value))
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def initialize_vit_mae_position_embeddings(model) -> None:
    """transformers 5.x builds `ViTMAEForPreTraining` from scratch with all-zero sin-cos position embeddings (a
    parent's init returns early once the patch projection is flagged initialised): compute them as MAE does."""
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)


def _build_config(model_args, overrides: dict[str, Any]):
    if model_args.config_name:
        return AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir, **overrides)
    if model_args.model_type == LDAEConfig.model_type:
        return LDAEConfig.from_preset(model_args.model_preset or "ldae-vit-base", **overrides)
    if model_args.model_preset:
        raise ValueError(f"--model_preset {model_args.model_preset!r} is an l-DAE preset but --model_type is "
                         f"{model_args.model_type!r}: drop --model_preset or use --model_type ldae.")
    try:
        return AutoConfig.for_model(model_args.model_type, **overrides)
    except ValueError:
        raise ValueError(f"--model_type {model_args.model_type!r} is not a model type transformers knows: use "
                         "ldae, vit_mae or another AutoModelForPreTraining type.") from None


def build_model(model_args) -> torch.nn.Module:
    """A pre-training model from a checkpoint (`model_name_or_path`), a config folder (`config_name`), an l-DAE
    preset (`model_preset`) or any registered `model_type`, with `config_overrides` applied."""
    overrides = parse_config_overrides(model_args.config_overrides)
    try:
        if model_args.model_name_or_path:
            return AutoModelForPreTraining.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token, **overrides
            )
        config = _build_config(model_args, overrides)
    except OSError as error:  # transformers' word for "no such checkpoint or config"
        source = model_args.model_name_or_path or model_args.config_name
        raise ValueError(f"{source}: {str(error).splitlines()[0]}") from None
    model = AutoModelForPreTraining.from_config(config)
    if config.model_type == "vit_mae":
        initialize_vit_mae_position_embeddings(model)
    return model


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class TrainingProgress:
    """Where the run is: optimizer steps done, and per process the epoch and the batches of it consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_loss: float | None = None
    knn_top1: float | None = None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    candidates = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / TRAINER_STATE_NAME).exists()]
    return max(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _comparable_config(config) -> dict[str, Any]:
    ignored = {"transformers_version", "auto_map", "architectures", "_name_or_path", "dtype", "torch_dtype"}
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in ignored}


# ---------------------------------------------------------------------------------------------------- trainer


class Pretrainer:
    """One pre-training run. `model_args`, `data_args`, `training_args` are the dataclasses of `run_pretrain.py`;
    `callbacks` are called as `callback(pretrainer)` on every process after each optimizer step (monitoring, fault
    injection in tests). Construction validates everything and raises `ValueError` before any work."""

    def __init__(self, model_args, data_args, training_args, callbacks: Sequence[Callable] = ()):
        self.model_args, self.data_args, self.args = model_args, data_args, training_args
        self.callbacks = list(callbacks)
        args = training_args
        if not args.output_dir:
            raise ValueError("--output_dir is required: the folder for checkpoints, logs and the final model.")
        self.output_dir = Path(args.output_dir)
        self.resume_dir = self._resolve_resume()
        self.accelerator = Accelerator(
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps,
                # Each process may end its epoch at a different batch (uneven stream shards): never let the end of a
                # dataloader force a gradient sync on one process only.
                sync_with_dataloader=False,
            ),
            mixed_precision=args.mixed_precision,
            dynamo_backend="inductor" if args.torch_compile else None,
            log_with=[JSONLinesTracker(self.output_dir / "logs"), *self._report_to()],
            project_dir=str(self.output_dir),
            dataloader_config=DataLoaderConfiguration(
                # The default for iterable data sets reads and decodes everything on the main process.
                dispatch_batches=False,
                use_seedable_sampler=True,
                data_seed=args.seed,
                non_blocking=args.dataloader_pin_memory,  # overlap the host-to-device copy of pinned batches
            ),
            # Optimizer steps are counted once per process group, so the scheduler steps once per optimizer step.
            step_scheduler_with_optimizer=False,
        )
        set_seed(args.seed)
        self.model = build_model(model_args)
        self.config = self.model.config  # `self.model` becomes the wrapped (DDP/FSDP) model after `prepare`
        self.is_ldae = isinstance(self.model, LDAEForPreTraining)
        self.image_size = self._image_size()
        if self.is_ldae and not all(0 <= t < self.config.num_timesteps for t in args.monitor_timesteps):
            raise ValueError(f"--monitor_timesteps {args.monitor_timesteps}: each t must be in [0, "
                             f"{self.config.num_timesteps}).")
        self._check_resume_config()
        self.pca_source = self._load_pca_source()
        self._open_data()
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.progress = TrainingProgress()
        self._stop_signal: int | None = None  # set by the signal handler on this process
        self._stopping = False  # set on every process at once, from the all-reduced signal flags
        self._monitor_data = None

    # -- setup ----------------------------------------------------------------------------------------------------

    def _report_to(self) -> list[str]:
        report_to = [name.strip() for name in (self.args.report_to or "none").split(",") if name.strip()]
        return [] if report_to in (["none"], []) else report_to

    def _resolve_resume(self) -> Path | None:
        requested = self.args.resume_from_checkpoint
        has_checkpoints = find_latest_checkpoint(self.output_dir) is not None
        if requested is None:
            if has_checkpoints or (self.output_dir / "config.json").exists():
                raise ValueError(f"--output_dir {self.output_dir} already holds checkpoints or a model: pass "
                                 "--resume_from_checkpoint latest to continue that run, or choose another --output_dir.")
            return None
        if requested == "latest":
            return find_latest_checkpoint(self.output_dir)  # None: nothing saved yet, start from scratch
        path = Path(requested)
        if not (path / TRAINER_STATE_NAME).exists():
            raise ValueError(f"--resume_from_checkpoint {requested}: no checkpoint there (no {TRAINER_STATE_NAME}); "
                             f"pass a {CHECKPOINT_PREFIX}<step> folder of this run or 'latest'.")
        return path

    def _image_size(self) -> int:
        size = getattr(self.config, "image_size", None)
        if not isinstance(size, int):
            raise ValueError(f"{type(self.model).__name__}'s config has no integer image_size: this script trains "
                             "square-image models (l-DAE, ViTMAE); set image_size with --config_overrides.")
        return size

    def _check_resume_config(self):
        if self.resume_dir is None:
            return
        saved = json.loads((self.resume_dir / TRAINER_STATE_NAME).read_text())
        if saved["model_config"] != _comparable_config(self.config):
            different = sorted(k for k in set(saved["model_config"]) | set(_comparable_config(self.config))
                               if saved["model_config"].get(k) != _comparable_config(self.config).get(k))
            raise ValueError(f"--resume_from_checkpoint {self.resume_dir} belongs to another model config "
                             f"(differs in {', '.join(different[:6])}): resume with the same model arguments.")
        layout = {"num_processes": self.accelerator.num_processes,
                  "per_device_train_batch_size": self.args.per_device_train_batch_size,
                  "gradient_accumulation_steps": self.args.gradient_accumulation_steps}
        changed = {k: (saved[k], v) for k, v in layout.items() if saved[k] != v}
        if changed:
            described = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume_from_checkpoint {self.resume_dir} was written with another batch layout "
                             f"({described}): resume with the same number of processes and batch settings.")

    def _load_pca_source(self):
        path = self.model_args.pca_from
        if path is None:
            return None
        if not self.is_ldae:
            raise ValueError(f"--pca_from applies to l-DAE models; this one is {type(self.model).__name__}: drop it.")
        try:
            source = LDAEModel.from_pretrained(path, cache_dir=self.model_args.cache_dir, token=self.model_args.token).pca
        except (OSError, ValueError) as error:
            raise ValueError(f"--pca_from {path}: {str(error).splitlines()[0]}") from None
        expected = self.model.ldae.pca.mean.shape
        if not source.is_fitted or source.mean.shape != expected:
            raise ValueError(f"--pca_from {path}: its PCA is not fitted or has another patch dimension "
                             f"({source.mean.numel()} values per patch, this model {expected[0]}).")
        return source

    def _load_split(self, split: str, streaming: bool):
        data_args = self.data_args
        return ldae_data.load_image_dataset(
            data_args.dataset_name if data_args.train_dir is None else None, data_args.dataset_config_name,
            data_args.train_dir, split=split, streaming=streaming, token=self.model_args.token,
            cache_dir=self.model_args.cache_dir,
        )

    def _open_data(self):
        data_args, args = self.data_args, self.args
        if data_args.train_dir is None and data_args.dataset_name is None:
            data_args.dataset_name = DEFAULT_DATASET
        streaming = data_args.streaming
        if streaming is None:  # Hub data sets stream, local ones are memory-mapped
            streaming = data_args.train_dir is None and not Path(data_args.dataset_name).expanduser().is_dir()
        self.streaming = streaming
        with self.accelerator.main_process_first():  # one process prepares the arrow cache, the others reuse it
            dataset = self._load_split(data_args.train_split, streaming)
        self.image_column = ldae_data.find_image_column(dataset, data_args.image_column_name)
        feature = (dataset.features or {}).get(self.image_column)
        if feature is not None and not isinstance(feature, datasets.Image) and feature != datasets.Value("binary"):
            raise ValueError(f"Column {self.image_column!r} holds {feature}, not images: name the image column with "
                             "--image_column_name.")
        id_column = data_args.example_id_column_name
        if args.log_example_ids and id_column is None:
            if streaming:
                raise ValueError("--log_example_ids on a stream needs --example_id_column_name (a stream has no row "
                                 "index): name a column holding a unique id per example.")
            id_column = "__row_index__"
            dataset = dataset.add_column(id_column, np.arange(len(dataset)))
        self.id_column = id_column if args.log_example_ids else None
        dataset = ldae_data.undecoded_columns(dataset, self.image_column, id_column=self.id_column)
        if data_args.max_train_samples is not None:
            dataset = (dataset.take(data_args.max_train_samples) if streaming
                       else dataset.select(range(min(data_args.max_train_samples, len(dataset)))))
        self.num_examples = self._count_examples(dataset)
        if self.num_examples == 0 or (streaming and next(iter(dataset), None) is None):
            source = data_args.train_dir or data_args.dataset_name
            raise ValueError(f"The training split {data_args.train_split!r} of {source} has no examples"
                             ": point --train_dir / --dataset_name at data with images.")
        self.max_steps, self.warmup_steps = self._schedule_lengths()
        if streaming:
            dataset = dataset.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer_size)
        self.train_dataset = dataset
        self.monitor_rows = self._monitor_rows()
        self.knn_rows = self._knn_rows() if args.knn_eval_steps else None

    def _count_examples(self, dataset) -> int | None:
        if not self.streaming:
            return len(dataset)
        data_args = self.data_args
        known = data_args.num_train_examples
        if known is None:
            splits = dataset.info.splits or {}
            info = splits.get(data_args.train_split)
            known = info.num_examples if info is not None and info.num_examples else None
        if known is not None and data_args.max_train_samples is not None:
            known = min(known, data_args.max_train_samples)
        return known

    def _schedule_lengths(self) -> tuple[int, int]:
        args = self.args
        global_batch = (args.per_device_train_batch_size * self.accelerator.num_processes
                        * args.gradient_accumulation_steps)
        steps_per_epoch = None if self.num_examples is None else steps_from_epochs(self.num_examples, global_batch, 1)
        if args.max_train_steps is not None:
            max_steps = args.max_train_steps
        elif steps_per_epoch is None:
            raise ValueError("The streamed data set does not tell its size, so epochs cannot become steps: pass "
                             "--max_train_steps, or --num_train_examples (the number of training images).")
        else:
            max_steps = steps_from_epochs(self.num_examples, global_batch, args.num_train_epochs)
        if args.num_warmup_steps is not None:
            warmup = args.num_warmup_steps
        elif steps_per_epoch is None:
            raise ValueError("--num_warmup_epochs needs the data set's size: pass --num_warmup_steps, or "
                             "--num_train_examples.")
        else:
            warmup = round(args.num_warmup_epochs * steps_per_epoch)
        self.global_batch = global_batch
        self.learning_rate = args.base_learning_rate * global_batch / 256
        return max_steps, min(warmup, max_steps)

    def _monitor_rows(self):
        """Fixed images for the held-out loss and the denoising picture: the first images of the evaluation split
        (`--eval_split`, else the first of validation/test that exists), else of the training split."""
        data_args = self.data_args
        if not (self.is_ldae and self.args.monitor_steps):
            return None
        candidates = [data_args.eval_split] if data_args.eval_split else list(MONITOR_SPLITS)
        for split in candidates:
            try:
                stream = self._load_split(split, streaming=True)
            except ValueError:
                if data_args.eval_split:
                    raise
                continue
            return _first_rows(ldae_data.undecoded_columns(stream, self.image_column), self.args.num_monitor_images)
        logger.warning("No validation/test split: the monitor images come from the training split (not held out).")
        stream = ldae_data.undecoded_columns(self._load_split(data_args.train_split, streaming=True), self.image_column)
        return _first_rows(stream, self.args.num_monitor_images)

    def _knn_rows(self):
        data_args = self.data_args
        if not isinstance(self.model, LDAEForPreTraining):
            raise ValueError("--knn_eval_steps monitors l-DAE features (LDAEModel); this model is "
                             f"{type(self.model).__name__}: drop --knn_eval_steps.")
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("--knn_eval_steps runs the encoder alone, which FSDP's sharded root cannot: drop it.")
        if not data_args.eval_split:
            raise ValueError("--knn_eval_steps needs a labelled evaluation split: pass --eval_split (e.g. validation).")
        train = self._load_split(data_args.train_split, streaming=True)
        queries = self._load_split(data_args.eval_split, streaming=True)
        label_column = ldae_data.find_label_column(queries, data_args.label_column_name)
        rows = {}
        for name, stream, count in (("train", train.shuffle(seed=self.args.seed, buffer_size=10_000),
                                     self.args.knn_train_samples), ("eval", queries, data_args.max_eval_samples)):
            rows[name] = _first_rows(ldae_data.undecoded_columns(stream, self.image_column, label_column), count)
        self.knn_label_column = label_column
        return rows

    # -- stage 1: PCA ---------------------------------------------------------------------------------------------

    def fit_pca(self):
        """Fit (or copy from `--pca_from`) the PCA tokenizer, save its picture, log its explained variance."""
        model, args = self.model, self.args
        if self.pca_source is not None:
            model.set_pca(self.pca_source.mean, self.pca_source.components, self.pca_source.eigenvalues)
            how = f"copied from {self.model_args.pca_from}"
        else:
            accelerator = self.accelerator
            num_images = args.pca_num_images if self.num_examples is None else min(args.pca_num_images, self.num_examples)
            patches_per_image = math.ceil(args.pca_num_patches / num_images)
            collator = ldae_data.DecodingCollator(ldae_data.pretrain_transform(self.image_size), self.image_column)
            sample = self.train_dataset  # undecoded; streams are already shuffled
            if self.streaming:
                sample = split_dataset_by_node(sample.take(num_images), accelerator.process_index,
                                               accelerator.num_processes)
            else:
                sample = sample.shuffle(seed=args.seed).select(range(num_images)).shard(
                    accelerator.num_processes, accelerator.process_index, contiguous=True)
            loader = DataLoader(sample, batch_size=args.per_device_train_batch_size, collate_fn=collator,
                                num_workers=args.dataloader_num_workers,
                                worker_init_fn=partial(_worker_init, accelerator.process_index))
            config = model.config
            accumulator = PatchPCAAccumulator(config.patch_size, config.num_channels, device=accelerator.device)
            generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
            for batch in tqdm(loader, desc="PCA", disable=not accelerator.is_local_main_process):
                if batch is not None:
                    accumulator.update(batch["pixel_values"].to(accelerator.device), patches_per_image, generator)
            accumulator.reduce(lambda t: accelerator.reduce(t, "sum"))
            model.set_pca(*accumulator.finalize())
            how = f"fitted on {int(accumulator.count)} patches of {num_images} images"
        pca = model.ldae.pca
        ratio = explained_variance_ratio(pca.eigenvalues, pca.pca_dim)
        logger.info("PCA tokenizer %s; the top %d components explain %.1f%% of the patch variance.",
                    how, pca.pca_dim, 100 * ratio)
        self.accelerator.log({"pca/explained_variance_top_d": ratio}, step=0)
        if self.accelerator.is_main_process:
            self._save_picture(self._pca_picture(), self.output_dir / "pca_components.png", "pca_components", 0)
        return ratio

    def _pca_picture(self) -> torch.Tensor:
        """The top components as p x p colour patches (the paper's Fig. 4), each stretched to [0, 1]."""
        config, pca = self.config, self.accelerator.unwrap_model(self.model).ldae.pca
        count = min(self.args.num_pca_picture_components, config.patch_dim)
        components = pca.components[:count].float()
        low, high = components.min(1, keepdim=True).values, components.max(1, keepdim=True).values
        components = (components - low) / (high - low).clamp_min(1e-12)
        tiles = unpatchify(components[:, None], config.patch_size, config.patch_size, config.patch_size)
        return make_grid(tiles, nrow=min(count, 16), padding=1, pad_value=1.0)

    # -- health signals -------------------------------------------------------------------------------------------

    def _monitor_inputs(self):
        rows = self.monitor_rows
        batch = ldae_data.DecodingCollator(ldae_data.pretrain_transform(self.image_size), self.image_column)(rows)
        images = batch["pixel_values"]
        config = self.config
        timesteps = torch.tensor(self.args.monitor_timesteps, dtype=torch.long)
        generator = torch.Generator().manual_seed(1234)
        num_patches = (self.image_size // config.patch_size) ** 2
        noise = torch.randn(len(timesteps), len(images), num_patches, config.pca_dim, generator=generator)
        return images, timesteps, noise

    @torch.no_grad()
    def monitor(self) -> dict[str, float]:
        """Held-out loss on the fixed (t, noise) grid next to the loss of copying the noisy input; saves the picture
        of clean / noised / denoised images. Every process runs it (FSDP needs all of them); the main one logs."""
        if self._monitor_data is None:
            self._monitor_data = self._monitor_inputs()
        images, timesteps, noise = self._monitor_data
        model, unwrapped, device = self.model, self.accelerator.unwrap_model(self.model), self.accelerator.device
        images = images.to(device)
        clean = patchify(images.float(), unwrapped.config.patch_size)
        metrics, tiles = {}, [images]
        model.eval()
        with self.accelerator.autocast():
            for t, eps in zip(timesteps.tolist(), noise):
                t_batch = torch.full((len(images),), t, dtype=torch.long, device=device)
                outputs = model(pixel_values=images, timesteps=t_batch, noise=eps.to(device))
                copied = patchify(outputs.noisy_pixel_values.float(), unwrapped.config.patch_size)
                metrics[f"monitor/loss_t{t}"] = unwrapped.loss(clean, outputs.logits, t_batch).item()
                metrics[f"monitor/copy_loss_t{t}"] = unwrapped.loss(clean, copied, t_batch).item()
                tiles += [outputs.noisy_pixel_values.float(),
                          unpatchify(outputs.logits.float(), unwrapped.config.patch_size, *images.shape[-2:])]
        model.train()
        metrics["monitor/loss"] = float(np.mean([v for k, v in metrics.items() if "/loss_t" in k]))
        metrics["monitor/copy_loss"] = float(np.mean([v for k, v in metrics.items() if "/copy_loss_t" in k]))
        if self.accelerator.is_main_process:
            shown = min(len(images), self.args.num_picture_images)
            # One row per image: clean, then (noised, denoised) per noise level.
            rows = torch.stack([tile[:shown] for tile in tiles], dim=1).flatten(0, 1)
            grid = make_grid(((rows + 1) / 2).clamp(0, 1).cpu(), nrow=len(tiles), padding=2, pad_value=1.0)
            step = self.progress.step
            self._save_picture(grid, self.output_dir / "denoising" / f"step-{step:07d}.png", "denoising", step)
        return metrics

    @torch.no_grad()
    def knn_eval(self) -> float:
        """k-NN top-1 (k = 20, T = 0.07) of L2-normalised `LDAEModel` features: each process embeds its share."""
        accelerator, backbone = self.accelerator, self.accelerator.unwrap_model(self.model).base_model
        collator = ldae_data.DecodingCollator(ldae_data.eval_transform(self.image_size), self.image_column,
                                              self.knn_label_column)
        features = {}
        backbone.eval()
        for name, rows in self.knn_rows.items():
            share = rows[accelerator.process_index::accelerator.num_processes]
            loader = DataLoader(share, batch_size=self.args.per_device_train_batch_size, collate_fn=collator,
                                num_workers=self.args.dataloader_num_workers,
                                worker_init_fn=partial(_worker_init, accelerator.process_index))
            local = []
            for batch in loader:
                if batch is None:
                    continue
                with accelerator.autocast():
                    pooled = backbone(pixel_values=batch["pixel_values"].to(accelerator.device)).pooler_output
                local.append((pooled.float().cpu(), batch["labels"]))
            gathered = gather_object(local)
            features[name] = (torch.cat([f for f, _ in gathered]), torch.cat([label for _, label in gathered]))
        backbone.train()
        (train_features, train_labels), (query_features, query_labels) = features["train"], features["eval"]
        num_classes = int(max(train_labels.max(), query_labels.max())) + 1
        k = min(20, len(train_features))
        return knn_top1(train_features, train_labels, query_features, query_labels, num_classes, k=k, temperature=0.07)

    def _save_picture(self, image: torch.Tensor, path: Path, name: str, step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, path)
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({name: image[None]}, step=step)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """`accelerator.save_state` into a temporary folder renamed into place; keeps the last
        `checkpoints_total_limit`. Also writes config + image processor so the folder loads with `from_pretrained`."""
        accelerator, step = self.accelerator, self.progress.step
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if final.exists():
            return final
        tmp = self.output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"  # same name on every process: all write into it
        positions = gather_object([(self.progress.epoch, self.progress.batch_in_epoch)])
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)
            unwrapped.config.save_pretrained(tmp)
            ldae_data.make_image_processor(self.image_size).save_pretrained(tmp)
            state = {
                "step": step, "positions": positions, "last_loss": self.progress.last_loss,
                "num_processes": accelerator.num_processes,
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                "model_config": _comparable_config(unwrapped.config),
            }
            (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2))
            tmp.rename(final)
            checkpoints = sorted((p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
                                 key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
            for old in checkpoints[: max(0, len(checkpoints) - self.args.checkpoints_total_limit)]:
                shutil.rmtree(old)
            logger.info("Saved %s", final)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path):
        self.accelerator.load_state(str(path))
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
        epoch, batch = state["positions"][self.accelerator.process_index]
        self.progress.step, self.progress.epoch, self.progress.batch_in_epoch = state["step"], epoch, batch
        self.progress.last_loss = state["last_loss"]
        logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, state["step"], epoch, batch)

    # -- stage 2: training ----------------------------------------------------------------------------------------

    def _train_loader(self) -> DataLoader:
        args = self.args
        collator = ldae_data.DecodingCollator(
            ldae_data.pretrain_transform(self.image_size, args.random_resized_crop, tuple(args.crop_scale)),
            self.image_column, id_column=self.id_column,
        )
        workers = args.dataloader_num_workers
        return DataLoader(
            self.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=not self.streaming,
            collate_fn=collator, num_workers=workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            # Persistent workers keep their copy of a stream, so a stream's per-epoch reshuffle would not reach them.
            persistent_workers=args.dataloader_persistent_workers and workers > 0 and not self.streaming,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(_worker_init, self.accelerator.process_index),
            generator=torch.Generator().manual_seed(args.seed),
        )

    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            self._stop_signal = signum
        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _noise_bin_losses(self, pixel_values, outputs) -> torch.Tensor:
        """(sum of per-example losses, count) per noise bin of equal t width, for the loss-per-noise-level signal."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        clean = patchify(pixel_values.float(), unwrapped.config.patch_size)
        bins = (outputs.timesteps * NUM_NOISE_BINS // unwrapped.config.num_timesteps).clamp_max(NUM_NOISE_BINS - 1)
        sums = torch.zeros(NUM_NOISE_BINS, 2, device=clean.device)
        with torch.no_grad():
            for index in range(NUM_NOISE_BINS):
                mask = bins == index
                if mask.any():
                    count = mask.sum()
                    sums[index, 0] = unwrapped.loss(clean[mask], outputs.logits[mask].detach(),
                                                    outputs.timesteps[mask]) * count
                    sums[index, 1] = count
        return sums

    def _noise_bin_names(self) -> list[str]:
        config = self.config
        edges = [timestep_to_sigma(torch.tensor(i * config.num_timesteps // NUM_NOISE_BINS), config).item()
                 for i in range(NUM_NOISE_BINS)] + [config.sigma_max]
        return [f"loss_by_sigma/{low:.2f}-{high:.2f}" for low, high in zip(edges, edges[1:])]

    def train(self) -> TrainingProgress:
        """Stage 1 (unless resuming or already fitted), stage 2, the final model. Returns the progress; raises
        `NonFiniteLossError`; on SIGTERM/SIGINT saves a checkpoint and raises `SystemExit(128 + signal)`."""
        accelerator, args, progress = self.accelerator, self.args, self.progress
        accelerator.init_trackers("ldae-pretraining", config=self._tracker_config())
        if self.is_ldae and self.resume_dir is None and not (
            self.model.ldae.pca.is_fitted and not self.model_args.pca_from
        ):
            self.fit_pca()
        optimizer = torch.optim.AdamW(
            adamw_param_groups(self.model, args.weight_decay), lr=self.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            fused=torch.cuda.is_available() or None,
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, self.max_steps)
        self.model, optimizer, loader, scheduler = accelerator.prepare(
            self.model, optimizer, self._train_loader(), scheduler
        )
        if self.resume_dir is not None:
            self.load_checkpoint(self.resume_dir)  # restores every process's RNG states too
        else:
            # The model samples t and noise from the global RNG: a different stream on every process. (Initial
            # weights came from the common seed; the data order has its own seeded generator.)
            set_seed(args.seed, device_specific=True)
        logger.info("Global batch %d (%d per device x %d processes x %d accumulation), lr %.3g (base %.3g x %d / 256), "
                    "%d steps (%d warm-up), %s examples.", self.global_batch, args.per_device_train_batch_size,
                    accelerator.num_processes, args.gradient_accumulation_steps, self.learning_rate,
                    args.base_learning_rate, self.global_batch, self.max_steps, self.warmup_steps,
                    self.num_examples if self.num_examples is not None else "unknown number of")
        previous_handlers = self._install_signal_handlers()
        try:
            self._loop(optimizer, loader, scheduler)
        except NonFiniteLossError:
            # Every process raises it at the same step, after the all-reduce that found it, so all can end the group.
            accelerator.end_training()
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if self._stopping:
            self.save_checkpoint()
            accelerator.end_training()
            raise SystemExit(128 + (self._stop_signal or signal.SIGTERM))  # the signal may have hit another process
        self.save_final_model()
        # Ending the process group joins gloo's worker threads while the interpreter is alive: one still releasing a
        # collective's tensor at interpreter exit aborts the process ("terminate called without an active exception").
        accelerator.end_training()
        return progress

    def _loop(self, optimizer, loader, scheduler):
        accelerator, args, progress, model = self.accelerator, self.args, self.progress, self.model
        ids_file = None
        if args.log_example_ids:
            ids_path = self.output_dir / "logs" / "example_ids" / f"rank{accelerator.process_index}.jsonl"
            ids_path.parent.mkdir(parents=True, exist_ok=True)
            ids_file = ids_path.open("a")
        bar = tqdm(total=self.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
                   desc="pre-training")
        device = accelerator.device
        window_loss = torch.zeros((), device=device)
        window_batches, window_images = 0, 0
        bins = torch.zeros(NUM_NOISE_BINS, 2, device=device)
        nonfinite = torch.zeros((), device=device)
        grad_norm = None
        empty = torch.zeros(1, self.config.num_channels, self.image_size, self.image_size, device=device)
        window_start = time.perf_counter()
        while progress.step < self.max_steps:
            loader.set_epoch(progress.epoch)
            epoch_loader = skip_first_batches(loader, progress.batch_in_epoch) if progress.batch_in_epoch else loader
            for batch in epoch_loader:
                progress.batch_in_epoch += 1
                weight = 1.0
                if batch is None:  # every image of this batch failed to decode: keep the processes in step
                    batch, weight = {"pixel_values": empty}, 0.0
                elif ids_file is not None:
                    ids = batch["example_ids"]
                    ids_file.write(json.dumps({"step": progress.step, "epoch": progress.epoch,
                                               "ids": ids.tolist() if torch.is_tensor(ids) else ids}) + "\n")
                is_log_step = (progress.step + 1) % args.logging_steps == 0
                with accelerator.accumulate(model):
                    outputs = model(pixel_values=batch["pixel_values"])
                    loss = outputs.loss * weight
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and (args.max_grad_norm or is_log_step):
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                nonfinite += (~torch.isfinite(loss)).float()
                window_loss += loss
                window_batches += 1
                window_images += len(batch["pixel_values"]) if weight else 0
                if self.is_ldae and is_log_step and weight:
                    bins += self._noise_bin_losses(batch["pixel_values"], outputs)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.step += 1
                # One small all-reduce per step: every process must agree to stop (signal on one, NaN on one).
                stop, bad = accelerator.reduce(torch.stack([torch.tensor(float(self._stop_signal is not None),
                                                                         device=device), nonfinite]), "sum").tolist()
                if bad:
                    raise NonFiniteLossError(
                        f"Non-finite loss at step {progress.step}: stopping; the last checkpoint is "
                        f"{find_latest_checkpoint(self.output_dir) or 'none'} (untouched). Lower --base_learning_rate, "
                        "set --max_grad_norm, or use bf16 instead of fp16, then resume with --resume_from_checkpoint."
                    )
                # Decide on the reduced flag only: a signal landing after the all-reduce waits for the next step.
                self._stopping = stop > 0
                if is_log_step:
                    elapsed = time.perf_counter() - window_start
                    totals = accelerator.reduce(torch.stack([window_loss, torch.tensor(float(window_images),
                                                device=device)]), "sum").tolist()
                    decode_failures = accelerator.reduce(torch.tensor(float(ldae_data.num_decode_failures()),
                                                                      device=device), "sum").item()
                    progress.last_loss = totals[0] / (window_batches * accelerator.num_processes)
                    metrics = {"train/loss": progress.last_loss, "train/lr": scheduler.get_last_lr()[0],
                               "train/grad_norm": float(grad_norm), "train/images_per_second": totals[1] / elapsed,
                               "train/epoch": progress.epoch, "data/decode_failures": int(decode_failures)}
                    if self.is_ldae:
                        bins = accelerator.reduce(bins, "sum")
                        for name, (total, count) in zip(self._noise_bin_names(), bins.tolist()):
                            if count:
                                metrics[name] = total / count
                    accelerator.log(metrics, step=progress.step)
                    bar.set_postfix(loss=f"{progress.last_loss:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                    img_s=f"{metrics['train/images_per_second']:.0f}")
                    window_loss.zero_()
                    bins.zero_()
                    window_batches, window_images, window_start = 0, 0, time.perf_counter()
                if self.monitor_rows is not None and progress.step % args.monitor_steps == 0:
                    accelerator.log(self.monitor(), step=progress.step)
                if args.knn_eval_steps and progress.step % args.knn_eval_steps == 0:
                    progress.knn_top1 = self.knn_eval()
                    accelerator.log({"knn/top1": progress.knn_top1}, step=progress.step)
                if args.checkpointing_steps and progress.step % args.checkpointing_steps == 0:
                    self.save_checkpoint()
                bar.update(1)
                for callback in self.callbacks:
                    callback(self)
                if self._stopping or progress.step >= self.max_steps:
                    break
            else:  # this process's share of the epoch ran out
                progress.epoch += 1
                progress.batch_in_epoch = 0
                continue
            break
        bar.close()
        if ids_file is not None:
            ids_file.close()

    # -- output ---------------------------------------------------------------------------------------------------

    def _tracker_config(self) -> dict[str, Any]:
        merged = {**asdict(self.model_args), **asdict(self.data_args), **asdict(self.args)}
        merged.pop("token", None)
        merged.pop("hub_token", None)
        return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in merged.items()}

    def save_final_model(self):
        """`save_pretrained` (safetensors) + image processor + model card into a temporary folder, then each file
        moved into `output_dir` (config.json last: until then the folder holds no new, half-written model)."""
        accelerator, args = self.accelerator, self.args
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)
            tmp = self.output_dir / f".tmp-final-{uuid.uuid4().hex[:8]}"
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            ldae_data.make_image_processor(self.image_size).save_pretrained(tmp)
            self._write_model_card(tmp)
            files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
            for file in files:
                os.replace(file, self.output_dir / file.name)
            tmp.rmdir()
            logger.info("Saved the final model to %s", self.output_dir)
            if args.push_to_hub:
                repo_id = args.hub_model_id or self.output_dir.resolve().name
                info = hub.push_to_hub(self.output_dir, repo_id, token=args.hub_token,
                                       private=args.hub_private_repo)
                logger.info("Uploaded to %s", info.commit_url)
        accelerator.wait_for_everyone()

    def _write_model_card(self, folder: Path):
        config, data_args = self.config, self.data_args
        # Hub metadata names Hub data sets only, not local folders.
        local = data_args.train_dir is not None or Path(data_args.dataset_name).expanduser().exists()
        dataset = None if local else data_args.dataset_name
        results = {"training steps": self.progress.step, "global batch": self.global_batch,
                   "final training loss": self.progress.last_loss}
        if self.progress.knn_top1 is not None:
            results["k-NN top-1 (k=20, T=0.07)"] = self.progress.knn_top1
        if self.is_ldae:
            pca = self.accelerator.unwrap_model(self.model).ldae.pca
            results[f"PCA variance explained (top {pca.pca_dim})"] = explained_variance_ratio(pca.eigenvalues,
                                                                                            pca.pca_dim)
            description = (
                f"l-DAE (latent denoising autoencoder) pre-trained with `run_pretrain.py` for {self.progress.step} "
                f"steps on {dataset or 'local images'}: a {config.num_hidden_layers}+{config.decoder_num_hidden_layers}"
                f"-block ViT at width {config.hidden_size} denoises {config.image_size}px images whose noise was "
                f"added in a {config.pca_dim}-dimensional patch-wise PCA latent. Load the encoder with "
                "`AutoModel.from_pretrained(...)` for features (encoder output at t = "
                f"{config.feature_timestep}, average-pooled), or fine-tune it with "
                "`AutoModelForImageClassification`."
            )
        else:
            description = (f"{type(self.model).__name__} pre-trained with `run_pretrain.py` (the l-DAE project's "
                           f"loop, as a baseline) for {self.progress.step} steps on {dataset or 'local images'}.")
        hub.write_model_card(
            folder, model_name=self.args.hub_model_id or self.output_dir.resolve().name,
            datasets=[dataset] if dataset else None, pipeline_tag="image-feature-extraction",
            tags=["ldae", "self-supervised-learning", "denoising-autoencoder", "vision"] if self.is_ldae
            else ["self-supervised-learning", "vision", config.model_type],
            description=description, training_arguments=self._tracker_config(), results=results,
        )
