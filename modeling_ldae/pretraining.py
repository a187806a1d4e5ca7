"""The pre-training engine for l-DAE (and any `AutoModelForPreTraining` whose forward returns a loss, such as the
ViTMAE baseline), on Accelerate. `run_pretrain.py` is the setup that calls it, top to bottom, as MAE's
`main_pretrain.py` calls its `engine_pretrain.py`:

    build_model -> open_training_data -> tokenizer (stage 1, l-DAE: `fit_pca` or `tokenizers`) -> make_train_loader ->
    train_one_epoch (stage 2, repeated) -> save_final_model

Checkpoints live in `checkpointing.py`, the health monitors in `monitors.py`.

Data: examples travel undecoded (`data.undecoded_columns`) until the collate function (`data.DecodingCollator`), which
runs after Accelerate split the data between processes, so each process decodes only its own share, once, whichever
way Accelerate shards (by files when a stream has at least as many shards as processes, else by batches of a stream
every process reads).
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.logging import get_logger
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForPreTraining
from transformers.trainer_utils import seed_worker

from . import data as ldae_data
from . import hub
from .cli import InputError, progress_bar_disabled
from .configuration_ldae import JOURNEY_STAGES, LDAEConfig
from .monitors import KnnResult, LoopState
from .pca import PatchPCAAccumulator, explained_variance_ratio

logger = get_logger(__name__)  # main process only

DEFAULT_DATASET = "ILSVRC/imagenet-1k"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


# ---------------------------------------------------------------------------------------------------- model


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """`"hidden_size=64,num_hidden_layers=2,qkv_bias=false"` -> dict (JSON values, else strings), as in the
    `transformers` examples' `--config_overrides`."""
    if not overrides:
        return {}
    parsed = {}
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--config_overrides: {item!r} is not key=value; write e.g. 'hidden_size=64,patch_size=8'.")
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
        raise InputError(f"--model_preset {model_args.model_preset!r} is an l-DAE preset but --model_type is "
                         f"{model_args.model_type!r}: drop --model_preset or use --model_type ldae.")
    try:
        return AutoConfig.for_model(model_args.model_type, **overrides)
    except ValueError:
        raise InputError(f"--model_type {model_args.model_type!r} is not a model type transformers knows: use "
                         "ldae, vit_mae or another AutoModelForPreTraining type.") from None


def check_override_keys(config_class, overrides: dict[str, Any]) -> None:
    """`PretrainedConfig` stores a key it does not know as a plain attribute that no model reads, so a typo in
    --config_overrides would train the default silently; the `transformers` examples refuse it, and so do we."""
    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters) - {"kwargs"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise InputError(f"--config_overrides: {config_class.__name__} has no key {unknown[0]!r}"
                         f"{f' (did you mean {close[0]!r}?)' if close else ''}; the keys are those of its config.json.")


def build_model(model_args) -> torch.nn.Module:
    """A pre-training model from a checkpoint (`model_name_or_path`), a config folder (`config_name`), an l-DAE
    preset (`model_preset`) or any registered `model_type`, with `config_overrides` applied."""
    overrides = parse_config_overrides(model_args.config_overrides)
    stage = getattr(model_args, "journey_stage", None)
    if stage is not None:
        if stage not in JOURNEY_STAGES:
            raise InputError(f"--journey_stage {stage!r}: expected one of {', '.join(JOURNEY_STAGES)}.")
        overrides = {**JOURNEY_STAGES[stage], **overrides}  # --config_overrides still wins (e.g. pca_dim)
    try:
        if model_args.model_name_or_path:
            check_override_keys(type(AutoConfig.from_pretrained(model_args.model_name_or_path,
                                                                cache_dir=model_args.cache_dir, token=model_args.token)),
                                overrides)
            return AutoModelForPreTraining.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token, **overrides
            )
        config = _build_config(model_args, overrides)
        check_override_keys(type(config), overrides)
    except (OSError, ValueError) as error:  # transformers' words for "no such checkpoint" and a bad config value
        if isinstance(error, InputError):
            raise
        source = model_args.model_name_or_path or model_args.config_name or "the model config"
        raise InputError(f"{source}: {str(error).splitlines()[0]}") from None
    model = AutoModelForPreTraining.from_config(config)
    if config.model_type == "vit_mae":
        initialize_vit_mae_position_embeddings(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (`--gradient_checkpointing`): transformers' current
    name where it has it (5.25 deprecates `gradient_checkpointing_enable`), the old one on releases without it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()


def square_image_size(model) -> int:
    size = getattr(model.config, "image_size", None)
    if not isinstance(size, int):
        raise InputError(f"{type(model).__name__}'s config has no integer image_size: this script trains square-image "
                         "models (l-DAE, ViTMAE); set image_size with --config_overrides.")
    return size


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The training split, undecoded, and what the loop needs to know about it."""

    source: ldae_data.DataSource
    dataset: ldae_data.AnyDataset
    image_column: str
    id_column: str | None
    num_examples: int | None  # None: a stream of unknown size
    streaming: bool


def open_training_data(data_args, token: str | None, cache_dir: str | None, seed: int, log_example_ids: bool,
                       accelerator: Accelerator) -> TrainingData:
    """The training split of `--dataset_name` (default ImageNet-1k from the Hub) or `--train_dir`, checked, cut to
    `--max_train_samples`, counted, shuffled if streamed; an id column when the example ids are logged."""
    source = ldae_data.DataSource(
        dataset_name=data_args.dataset_name if data_args.train_dir is not None or data_args.dataset_name
        else DEFAULT_DATASET,
        dataset_config_name=data_args.dataset_config_name, train_dir=data_args.train_dir, token=token,
        cache_dir=cache_dir,
    )
    streaming = data_args.streaming
    if streaming is None:  # Hub data sets stream, local ones are memory-mapped
        streaming = not source.is_local
    with accelerator.main_process_first():  # one process prepares the arrow cache, the others reuse it
        dataset, num_examples = ldae_data.open_split(
            source, data_args.train_split_name, streaming, max_samples=data_args.max_train_samples,
            num_examples=data_args.num_train_examples,
        )
    image_column = ldae_data.find_image_column(dataset, data_args.image_column_name)
    feature = (dataset.features or {}).get(image_column)
    if feature is not None and not isinstance(feature, datasets.Image) and feature != datasets.Value("binary"):
        raise InputError(f"Column {image_column!r} holds {feature}, not images: name the image column with "
                         "--image_column_name.")
    id_column = data_args.example_id_column_name if log_example_ids else None
    if log_example_ids and id_column is None:
        if streaming:
            raise InputError("--log_example_ids on a stream needs --example_id_column_name (a stream has no row "
                             "index): name a column holding a unique id per example.")
        id_column = "__row_index__"
        dataset = dataset.add_column(id_column, np.arange(len(dataset)))
    dataset = ldae_data.undecoded_columns(dataset, image_column, id_column=id_column)
    if streaming:
        dataset = dataset.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    return TrainingData(source, dataset, image_column, id_column, num_examples, streaming)


def first_rows(source: ldae_data.DataSource, split: str, image_column: str, count: int,
               label_column: str | None = None, shuffle_seed: int | None = None) -> list[dict[str, Any]]:
    """The first `count` undecoded rows of a split (after a seeded shuffle buffer, if `shuffle_seed`), streamed."""
    stream = source.load(split, streaming=True)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=10_000)
    return list(ldae_data.undecoded_columns(stream, image_column, label_column).take(count))


def _worker_init(process_index: int, num_workers: int, worker_id: int):
    # A pre-emption signal reaches the whole process group: workers must outlive the main process's checkpoint.
    # (`cli.report_errors` kills them when the process ends on an error.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Torch seeds workers alike on every process; the rank offset makes augmentations differ between processes.
    seed_worker(worker_id, num_workers, process_index)


def make_loader(dataset, collator, batch_size: int, num_workers: int, process_index: int, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
                      worker_init_fn=partial(_worker_init, process_index, num_workers), **kwargs)


def make_train_loader(data: TrainingData, args, image_size: int, num_workers: int, process_index: int) -> DataLoader:
    collator = ldae_data.DecodingCollator(
        ldae_data.pretrain_transform(image_size, args.random_resized_crop, tuple(args.crop_scale)),
        data.image_column, id_column=data.id_column,
    )
    return make_loader(
        data.dataset, collator, args.per_device_train_batch_size, num_workers, process_index,
        shuffle=not data.streaming, pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        # Persistent workers keep their copy of a stream, so a stream's per-epoch reshuffle would not reach them.
        persistent_workers=args.dataloader_persistent_workers and num_workers > 0 and not data.streaming,
        prefetch_factor=args.dataloader_prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed),
    )


# ---------------------------------------------------------------------------------------------------- stage 1


def fit_pca(config, data: TrainingData, image_size: int, num_images: int, num_patches: int, batch_size: int,
            num_workers: int, seed: int, accelerator: Accelerator, disable_tqdm: bool | None = None):
    """Fit the patch-wise PCA on `num_patches` random patches of `num_images` random training images (center
    crops), each process reading its share, exact float64 sums added across processes. Returns (mean, components,
    eigenvalues, a description for the log)."""
    num_images = num_images if data.num_examples is None else min(num_images, data.num_examples)
    patches_per_image = math.ceil(num_patches / num_images)
    if data.streaming:  # already shuffled
        sample = split_dataset_by_node(data.dataset.take(num_images), accelerator.process_index,
                                       accelerator.num_processes)
    else:
        sample = data.dataset.shuffle(seed=seed).select(range(num_images)).shard(
            accelerator.num_processes, accelerator.process_index, contiguous=True)
    collator = ldae_data.DecodingCollator(ldae_data.pretrain_transform(image_size), data.image_column)
    loader = make_loader(sample, collator, batch_size, num_workers, accelerator.process_index)
    accumulator = PatchPCAAccumulator(config.patch_size, config.num_channels, device=accelerator.device)
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    for batch in tqdm(loader, desc="PCA", disable=progress_bar_disabled(disable_tqdm, accelerator)):
        if batch is not None:
            accumulator.update(batch["pixel_values"].to(accelerator.device), patches_per_image, generator)
    accumulator.reduce(lambda tensor: accelerator.reduce(tensor, "sum"))
    return (*accumulator.finalize(), f"fitted on {int(accumulator.count)} patches of {num_images} images")


# ---------------------------------------------------------------------------------------------------- stage 2


class StopRequest:
    """SIGTERM / SIGINT handling for the loop: a signal only sets a flag (and calls `on_signal`, which must be as
    quick: the output folder's owner marks itself draining); every step the processes all-reduce their flags (and
    their non-finite loss counts), so that all stop at the same step, checkpoint and exit together."""

    def __init__(self, on_signal: Callable[[], None] = lambda: None):
        self.signal: int | None = None  # received by this process
        self.agreed = False  # some process received one: stop after this step
        self.on_signal = on_signal

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._receive) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _receive(self, signum, frame):
        self.signal = signum
        self.on_signal()

    def synchronize(self, accelerator: Accelerator, nonfinite: torch.Tensor, step: int, latest: Path | None):
        stop, bad = accelerator.reduce(torch.stack([torch.tensor(float(self.signal is not None),
                                                                 device=nonfinite.device), nonfinite]), "sum").tolist()
        if bad:
            raise NonFiniteLossError(
                f"Non-finite loss at step {step}: stopping; the last checkpoint is {latest or 'none'} (untouched). "
                "Lower --base_learning_rate, set --max_grad_norm, or use bf16 instead of fp16, then resume with "
                "--resume_from_checkpoint."
            )
        # Decide on the reduced flag only: a signal landing after the all-reduce waits for the next step.
        self.agreed = stop > 0

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)  # the signal may have reached another process only


class LossWindow:
    """Training loss and throughput between two log steps, weighted so that the zero-weight stand-ins for batches
    whose images all failed to decode do not count."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(3, device=device)  # weighted loss sum, weight sum, images
        self.nonfinite = torch.zeros((), device=device)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, weight: float, images: int):
        self.nonfinite += (~torch.isfinite(loss)).float()
        if weight:
            self.totals += torch.stack([loss * weight, loss.new_tensor(weight), loss.new_tensor(float(images))])

    def metrics(self, accelerator: Accelerator) -> dict[str, float]:
        loss_sum, weight_sum, images = accelerator.reduce(self.totals, "sum").tolist()
        failures = accelerator.reduce(torch.tensor(float(ldae_data.num_decode_failures()),
                                                   device=self.totals.device), "sum").item()
        metrics = {"train/images_per_second": images / (time.perf_counter() - self.start),
                   "data/decode_failures": int(failures)}
        if weight_sum:
            metrics["train/loss"] = loss_sum / weight_sum
        self.totals.zero_()
        self.start = time.perf_counter()
        return metrics


def train_one_epoch(model, loader, optimizer, scheduler, state: LoopState, window: LossWindow, args, max_steps: int,
                    hooks, stop: StopRequest, save_checkpoint) -> None:
    """Optimizer steps over the rest of this process's share of epoch `state.epoch`, until it ends, `max_steps` is
    reached or the processes agree to stop. Logs the `window` every `args.logging_steps` (it spans epochs),
    checkpoints every `args.save_steps` (`save_checkpoint(state)`), calls the hooks."""
    accelerator = state.accelerator
    loader.set_epoch(state.epoch)
    batches = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
    grad_norm = None
    for batch in batches:
        state.batch_in_epoch += 1
        weight = 1.0
        if batch is None:  # every image of this batch failed to decode: a zero-weight stand-in keeps processes in step
            config = accelerator.unwrap_model(model).config
            blank = torch.zeros(1, config.num_channels, config.image_size, config.image_size, device=accelerator.device)
            batch, weight = {"pixel_values": blank}, 0.0
        is_log_step = (state.step + 1) % args.logging_steps == 0
        with accelerator.accumulate(model):
            outputs = model(pixel_values=batch["pixel_values"])
            loss = outputs.loss * weight
            accelerator.backward(loss)
            if accelerator.sync_gradients and (args.max_grad_norm or is_log_step):
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.add(loss.detach(), weight, len(batch["pixel_values"]))
        for hook in hooks:
            hook.on_batch(state, batch, outputs, weight)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.step += 1
        stop.synchronize(accelerator, window.nonfinite, state.step, state.last_checkpoint)
        metrics = {}
        if is_log_step:
            metrics = {**window.metrics(accelerator), "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/epoch": state.epoch}
            state.last_loss = metrics.get("train/loss", state.last_loss)
        if args.save_steps and state.step % args.save_steps == 0:  # before the hooks: a failing monitor costs no step
            save_checkpoint(state)
        for hook in hooks:
            metrics.update(hook.on_step(state))
        if metrics:
            accelerator.log(metrics, step=state.step)
        if stop.agreed or state.step >= max_steps:
            return
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0


# ---------------------------------------------------------------------------------------------------- output


def save_final_model(accelerator: Accelerator, model, output_dir: Path, image_size: int, write_card) -> None:
    """`save_pretrained` (safetensors) + image processor + model card (`write_card(folder)`) into a temporary
    folder, then each file moved into `output_dir`, `config.json` last: until then the folder holds no new model,
    and a failure (a full disk) leaves none half-written."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        temporary = output_dir / f".tmp-final-{uuid.uuid4().hex[:8]}"
        try:
            accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
            ldae_data.make_image_processor(image_size).save_pretrained(temporary)
            write_card(temporary)
            for file in sorted(temporary.iterdir(), key=lambda path: path.name == "config.json"):
                file.replace(output_dir / file.name)
        finally:
            if temporary.exists():
                for file in temporary.iterdir():
                    file.unlink()
                temporary.rmdir()
        logger.info("Saved the final model to %s", output_dir)
    accelerator.wait_for_everyone()


def write_pretraining_card(folder: Path, model, source: ldae_data.DataSource, repo_id: str, steps: int,
                           global_batch: int, last_loss: float | None, knn: KnnResult | None,
                           knn_splits: tuple[str, str | None], arguments: dict[str, Any]) -> None:
    """The output folder's README.md: what was trained on what, the k-NN monitor's last result (bank: the first
    split of `knn_splits`, queries: the second) as model-index, the run's figures and arguments."""
    config, dataset = model.config, hub.hub_id(None if source.is_local else source.name)
    results = {"training steps": steps, "global batch": global_batch, "final training loss": last_loss}
    eval_results = []
    if knn is not None:
        bank_split, query_split = knn_splits
        eval_results.append(hub.accuracy_result(
            knn.top1 / 100, "k-NN top-1 accuracy", "k-NN classification of the frozen features",
            hub.CardDataset.of(source.name, query_split, source.dataset_config_name), k=knn.k,
            temperature=knn.temperature, bank_size=knn.bank_size, bank_split=bank_split, query_size=knn.query_size,
        ))
    is_ldae = config.model_type == LDAEConfig.model_type
    if is_ldae:
        if config.tokenizer_type == "pca":
            pca = model.ldae.pca
            results[f"PCA variance explained (top {pca.pca_dim})"] = explained_variance_ratio(pca.eigenvalues,
                                                                                               pca.pca_dim)
        latent = {"pca": "patch-wise PCA latent", "identity": "pixel space (the identity tokenizer)",
                  "patch_ae": "latent of a patch-wise linear autoencoder",
                  "patch_vae": "latent of a patch-wise linear VAE",
                  "conv_vae": "latent of a convolutional VAE (diffusers' AutoencoderKL)"}[config.tokenizer_type]
        description = (
            f"l-DAE (latent denoising autoencoder) pre-trained with `run_pretrain.py` for {steps} steps on "
            f"{dataset or 'local images'}: a {config.num_hidden_layers}+{config.decoder_num_hidden_layers}-block ViT "
            f"at width {config.hidden_size} denoises {config.image_size}px images whose noise was added in a "
            f"{config.pca_dim}-dimensional {latent}. Load the encoder with `AutoModel.from_pretrained(...)`"
            f" for features (encoder output at t = {config.feature_timestep}, average-pooled), or fine-tune it with "
            "`AutoModelForImageClassification`."
        )
        journey = {key: getattr(config, key) for key in ("noise_schedule", "prediction_type", "denoiser_input",
                                                          "denoiser_output") if getattr(config, key) != getattr(
                                                              LDAEConfig(), key)}
        if journey:
            description += (" A stage of the paper's deconstructive journey, not l-DAE itself: "
                            + ", ".join(f"{key}={value}" for key, value in journey.items()) + ".")
    else:
        description = (f"{type(model).__name__} pre-trained with `run_pretrain.py` (the l-DAE project's loop, as a "
                       f"baseline) for {steps} steps on {dataset or 'local images'}.")
    hub.write_model_card(
        folder, model_name=repo_id, config=config, datasets=[dataset] if dataset else None,
        pipeline_tag="image-feature-extraction",
        tags=["ldae", "self-supervised-learning", "denoising-autoencoder", "vision"] if is_ldae
        else ["self-supervised-learning", "vision", config.model_type],
        description=description, eval_results=eval_results, figures=results, training_arguments=arguments,
    )
