"""Health signals of a pre-training run, each a small hook the loop calls on every process:

- `NoiseBinLosses`: the training loss per noise-level bin (does the model learn at every noise level?), labelled in
  the schedule's own terms (sigma ranges unscaled, gamma^2 ranges variance-preserving);
- `HeldOutDenoising`: the loss on fixed held-out images and a fixed (t, noise) grid, next to the loss of copying the
  noisy input, expressed in the model's target (`LDAEForPreTraining.copy_prediction`: a model that learned nothing
  scores about the copy), and a labelled picture of the denoising, whatever the target;
- `KnnMonitor`: k-NN top-1 of the encoder's features (is the representation improving?);
- `ExampleIdLog`: the example ids each process trained on (to check the data split between processes);
- `ProgressBar`: steps and the last loss on the console.

A hook sees the `LoopState` after each micro-batch (`on_batch`) and after each optimizer step (`on_step`, which
returns metrics to log). Metrics go to `logs/metrics.jsonl` through `JSONLinesTracker`, pictures to files and to any
tracker that takes images. The picture of the PCA tokenizer (`save_pca_picture`) is drawn once, after its fit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cli import progress_bar_disabled
from .data import DecodingCollator, eval_transform, pretrain_transform
from .features import extract_features
from .knn import knn_top1
from .modeling_ldae import unpatchify
from .pca import explained_variance_ratio
from .scheduling_ldae import LDAENoiseScheduler

matplotlib.use("Agg")  # pictures are files: no display
import matplotlib.pyplot as plt  # noqa: E402

NUM_NOISE_BINS = 4
logger = get_logger(__name__)  # main process only


@dataclass
class LoopState:
    """Where the run is, what the loop and its hooks share: the accelerator and (prepared) model, the output folder,
    the optimizer steps done (`step`), this process's data position, the last logged loss and checkpoint."""

    accelerator: Accelerator
    model: torch.nn.Module
    output_dir: Path
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_loss: float | None = None
    last_checkpoint: Path | None = None


class TrainingHook:
    """Called on every process (collectives inside a hook are fine: all processes reach it at the same step)."""

    def on_batch(self, state: LoopState, batch: dict[str, Any], outputs, weight: float) -> None:
        """After the forward / backward of one micro-batch (`weight` 0: a stand-in for a batch that failed to
        decode); `state.step` is the number of optimizer steps done before it."""

    def on_step(self, state: LoopState) -> dict[str, float]:
        """After optimizer step `state.step`; returns metrics to log at that step."""
        return {}


# ---------------------------------------------------------------------------------------------------- logging


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


def loggable(values: dict[str, Any]) -> dict[str, Any]:
    """Argument values as trackers take them: numbers, strings, booleans and None; anything else as its string."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in values.items()}


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records `JSONLinesTracker` wrote for a run."""
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def save_figure(figure, path: Path, accelerator: Accelerator, name: str, step: int) -> None:
    """Write a matplotlib figure to `path` and hand it to every tracker that logs images (main process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    figure.canvas.draw()
    pixels = torch.from_numpy(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1)
    plt.close(figure)
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({name: pixels[None]}, step=step)


# ---------------------------------------------------------------------------------------------------- pictures


def _show(axis, image: torch.Tensor, title: str | None = None, **title_kwargs) -> None:
    """One CHW image in [0, 1], enlarged with nearest-neighbour sampling (pixels stay pixels)."""
    axis.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8, **title_kwargs)


def pca_figure(pca, patch_size: int, count: int = 64):
    """The top `count` PCA components as p x p colour patches (the paper's Fig. 4), each stretched to [0, 1] and
    titled with its share of the patch variance; the d latent components in bold."""
    count = min(count, pca.components.shape[0])
    components = pca.components[:count].float().cpu()
    low, high = components.min(1, keepdim=True).values, components.max(1, keepdim=True).values
    tiles = unpatchify(((components - low) / (high - low).clamp_min(1e-12))[:, None], patch_size, patch_size,
                       patch_size)
    shares = (pca.eigenvalues / pca.eigenvalues.sum()).tolist()
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.35 * rows + 0.6), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index < count:
            _show(axis, tiles[index], f"{index + 1}: {100 * shares[index]:.1f}%",
                  fontweight="bold" if index < pca.pca_dim else "normal")
        else:
            axis.axis("off")
    figure.suptitle(f"PCA components (bold: the d = {pca.pca_dim} latent ones, "
                    f"{100 * explained_variance_ratio(pca.eigenvalues, pca.pca_dim):.1f}% of the variance)", fontsize=9)
    figure.tight_layout()
    return figure


def report_pca(model, how: str, accelerator: Accelerator, output_dir: Path, count: int = 64) -> None:
    """Log the variance the d latent components explain and save `pca_components.png`, after stage 1."""
    pca = model.ldae.pca
    ratio = explained_variance_ratio(pca.eigenvalues, pca.pca_dim)
    logger.info("PCA tokenizer %s; the top %d components explain %.1f%% of the patch variance.", how, pca.pca_dim,
                100 * ratio)
    accelerator.log({"pca/explained_variance_top_d": ratio}, step=0)
    if accelerator.is_main_process:
        figure = pca_figure(pca, model.config.patch_size, count)
        save_figure(figure, output_dir / "pca_components.png", accelerator, "pca_components", 0)


def noise_level(config, timestep: int) -> tuple[str, float]:
    """The schedule's own measure of the noise at t: ("σ", sigma_t) unscaled, ("γ²", gamma_t^2) variance-preserving."""
    gamma, sigma = (value.item() for value in LDAENoiseScheduler.from_config(config).noise_levels(timestep))
    return ("γ²", gamma**2) if config.variance_preserving else ("σ", sigma)


def denoising_figure(clean: torch.Tensor, noisy: Sequence[torch.Tensor], denoised: Sequence[torch.Tensor],
                     labels: Sequence[str]):
    """One row per image: the clean image, then for each noise level the noisy input and the prediction; columns
    titled with the noise level (`labels`). Images in [-1, 1]."""
    columns = [("clean", clean)]
    for label, noisy_images, predicted in zip(labels, noisy, denoised):
        columns += [(f"noisy {label}", noisy_images), (f"denoised {label}", predicted)]
    rows = len(clean)
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.25 * len(columns), 1.2 * rows + 0.4), squeeze=False)
    for row in range(rows):
        for column, (title, images) in enumerate(columns):
            _show(axes[row, column], (images[row].float() + 1) / 2, title if row == 0 else None)
        axes[row, 0].set_ylabel(f"image {row + 1}", fontsize=8)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------------- hooks


class NoiseBinLosses(TrainingHook):
    """Training loss per bin of equal t width, on the micro-batches of every `every`-th step (reduced over
    processes), for l-DAE models: one number per noise range, labelled by the schedule's sigma range (unscaled,
    `loss_by_sigma/0.00-0.35`) or gamma^2 range (variance-preserving, `loss_by_gamma_squared/1.00-0.75`)."""

    def __init__(self, config, every: int):
        self.config, self.every = config, every
        self.sums = None
        steps = [i * config.num_timesteps // NUM_NOISE_BINS for i in range(NUM_NOISE_BINS)] + [config.num_timesteps - 1]
        edges = [noise_level(config, t)[1] for t in steps]
        # gamma^2 of linear-beta spans four decades in the last bins: significant digits, not decimals.
        measure, digits = ("gamma_squared", ".3g") if config.variance_preserving else ("sigma", ".2f")
        self.names = [f"loss_by_{measure}/{start:{digits}}-{end:{digits}}" for start, end in zip(edges, edges[1:])]

    @torch.no_grad()
    def on_batch(self, state, batch, outputs, weight):
        if (state.step + 1) % self.every or not weight:
            return
        model = state.accelerator.unwrap_model(state.model)
        targets = outputs.targets
        bins = (outputs.timesteps * NUM_NOISE_BINS // self.config.num_timesteps).clamp_max(NUM_NOISE_BINS - 1)
        if self.sums is None:
            self.sums = torch.zeros(NUM_NOISE_BINS, 2, device=targets.device)
        for index in range(NUM_NOISE_BINS):
            mask = bins == index
            if mask.any():
                count = mask.sum()
                self.sums[index, 0] += model.loss(targets[mask], outputs.logits[mask].detach(),
                                                  outputs.timesteps[mask]) * count
                self.sums[index, 1] += count

    def on_step(self, state):
        if state.step % self.every:
            return {}
        sums = self.sums if self.sums is not None else torch.zeros(NUM_NOISE_BINS, 2,
                                                                   device=state.accelerator.device)
        sums = state.accelerator.reduce(sums, "sum")
        self.sums = None
        return {name: total / count for name, (total, count) in zip(self.names, sums.tolist()) if count}


class HeldOutDenoising(TrainingHook):
    """Every `every` steps: the loss on fixed held-out images at fixed (t, noise) pairs, next to the loss of copying
    the noisy input in the model's target terms (`copy_loss`; their ratio below 1 means the model denoises), and the
    denoising picture
    `denoising/step-<step>.png` (main process). Every process runs the model: FSDP needs all of them."""

    def __init__(self, rows: list[dict[str, Any]], image_column: str, config, timesteps: Sequence[int], every: int,
                 num_picture_images: int):
        collated = DecodingCollator(pretrain_transform(config.image_size), image_column)(rows)
        if collated is None:
            raise ValueError("None of the monitor images could be decoded: check the evaluation split.")
        self.images, self.config, self.every = collated["pixel_values"], config, every
        self.timesteps = list(timesteps)
        num_patches = (config.image_size // config.patch_size) ** 2
        generator = torch.Generator().manual_seed(1234)
        self.noise = torch.randn(len(self.timesteps), len(self.images), num_patches, config.pca_dim,
                                 generator=generator)
        self.num_picture_images = num_picture_images

    @torch.no_grad()
    def on_step(self, state):
        if state.step % self.every:
            return {}
        accelerator, model = state.accelerator, state.model
        unwrapped = accelerator.unwrap_model(model)
        images = self.images.to(accelerator.device)
        size = images.shape[-2:]
        tokenizer = unwrapped.ldae.latent_tokenizer
        metrics, noisy, denoised = {}, [], []
        model.eval()
        with accelerator.autocast():
            for t, noise in zip(self.timesteps, self.noise):
                timesteps = torch.full((len(images),), t, dtype=torch.long, device=accelerator.device)
                outputs = model(pixel_values=images, timesteps=timesteps, noise=noise.to(accelerator.device))
                copied = unwrapped.copy_prediction(outputs, *size)
                metrics[f"monitor/loss_t{t}"] = unwrapped.loss(outputs.targets, outputs.logits, timesteps).item()
                metrics[f"monitor/copy_loss_t{t}"] = unwrapped.loss(outputs.targets, copied, timesteps).item()
                noisy_images = outputs.noisy_pixel_values
                if noisy_images is None:  # a latent-space denoiser: show its input through the tokenizer
                    noisy_images = tokenizer.decode_images(outputs.noisy_latents, *size)
                noisy.append(noisy_images.float().cpu())
                denoised.append(unwrapped.denoised_images(outputs, *size).float().cpu())
        model.train()
        metrics["monitor/loss"] = float(np.mean([metrics[f"monitor/loss_t{t}"] for t in self.timesteps]))
        metrics["monitor/copy_loss"] = float(np.mean([metrics[f"monitor/copy_loss_t{t}"] for t in self.timesteps]))
        if accelerator.is_main_process:
            shown = min(len(images), self.num_picture_images)
            labels = ["t={}\n{}={:.3g}".format(t, *noise_level(self.config, t)) for t in self.timesteps]
            figure = denoising_figure(self.images[:shown], [n[:shown] for n in noisy], [d[:shown] for d in denoised],
                                      labels)
            save_figure(figure, state.output_dir / "denoising" / f"step-{state.step:07d}.png", accelerator,
                        "denoising", state.step)
        return metrics


@dataclass(frozen=True)
class KnnResult:
    """A k-NN evaluation: top-1 in percent and what it ran on (it runs on a subsample, so the card says how large)."""

    top1: float
    k: int
    temperature: float
    bank_size: int
    query_size: int


class KnnMonitor(TrainingHook):
    """Every `every` steps: k-NN top-1 (k = 20, T = 0.07) of the encoder's pooled features (`LDAEModel`, clean image
    at the feature t) of held-out queries against a labelled bank of training images; each process encodes its
    share. `last_result` keeps the latest (for the model card)."""

    temperature = 0.07

    def __init__(self, bank_rows, query_rows, image_column: str, label_column: str, image_size: int, every: int,
                 batch_size: int, accelerator: Accelerator):
        collator = DecodingCollator(eval_transform(image_size), image_column, label_column, failed_images="blank")
        # Sharded like the training data, but not registered with the accelerator: checkpoints hold the training
        # loader's state only, so a run resumes with or without this monitor.
        self.loaders = [prepare_data_loader(DataLoader(rows, batch_size=batch_size, collate_fn=collator),
                                            accelerator.device, accelerator.num_processes, accelerator.process_index,
                                            put_on_device=True)
                        for rows in (bank_rows, query_rows)]
        self.every = every
        self.last_result: KnnResult | None = None

    @torch.no_grad()
    def on_step(self, state):
        if state.step % self.every:
            return {}
        backbone = state.accelerator.unwrap_model(state.model).base_model.eval()
        encode = lambda pixel_values: backbone(pixel_values=pixel_values).pooler_output  # noqa: E731
        (bank, bank_labels), (queries, query_labels) = (extract_features(encode, loader, state.accelerator)
                                                        for loader in self.loaders)
        backbone.train()
        keep, answered = bank_labels >= 0, query_labels >= 0  # images that failed to decode are blank stand-ins
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
        k = min(20, int(keep.sum()))
        top1 = knn_top1(bank[keep], bank_labels[keep], queries[answered], query_labels[answered], num_classes, k=k,
                        temperature=self.temperature)
        self.last_result = KnnResult(top1, k, self.temperature, int(keep.sum()), int(answered.sum()))
        return {"knn/top1": top1}


class ProgressBar(TrainingHook):
    """The progress bar of the local main process: steps and the last logged loss. A context manager that closes
    the bar."""

    def __init__(self, total: int, initial: int, accelerator: Accelerator, disable_tqdm: bool | None = None):
        self.bar = tqdm(total=total, initial=initial, desc="pre-training",
                        disable=progress_bar_disabled(disable_tqdm, accelerator))

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info):
        self.bar.close()  # ends the bar's line, so that an error message starts on its own line

    def on_step(self, state):
        self.bar.update(state.step - self.bar.n)
        if state.last_loss is not None:
            self.bar.set_postfix(loss=f"{state.last_loss:.4f}", refresh=False)
        return {}


class ExampleIdLog(TrainingHook):
    """Appends `{"step", "epoch", "ids"}` per micro-batch to `logs/example_ids/rank<process>.jsonl`."""

    def __init__(self, output_dir: Path, process_index: int):
        self.path = output_dir / "logs" / "example_ids" / f"rank{process_index}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_batch(self, state, batch, outputs, weight):
        if weight:
            ids = batch["example_ids"]
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.step, "epoch": state.epoch,
                                       "ids": ids.tolist() if torch.is_tensor(ids) else ids}) + "\n")
