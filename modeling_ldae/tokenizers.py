"""Stage 1 of pre-training: the tokenizer, fitted or trained before denoising, then frozen.

- The patch PCA is fitted exactly (`pca.py`); the identity needs nothing.
- The learned tokenizers of the journey's stage 3 (patch AE, patch VAE, conv VAE) are trained here on the training
  images with their own objective, per token: the summed squared error of its pixels plus, for a VAE,
  `kl_weight` times KL[posterior | N(0, I)] summed over its d dimensions; mean over tokens. Defaults: 0.01 for the
  patch VAE (at 1, only 7 of 16 dimensions stayed active; at 0.01 all do) and LDM's KL-f8 value 1e-6 for the conv
  VAE. Then one scalar, `latent_scale`, makes their mean per-dimension latent variance equal the patch PCA's at the
  same d, so that a noise level means the same for every tokenizer.

Each tokenizer is an artefact of its own, `<output_dir>/tokenizer/` (`tokenizer.safetensors` + `tokenizer.json`
with its figures), reused by other runs through `--tokenizer_from`. Training resumes from
`<output_dir>/tokenizer-training/` (weights, optimizer and step; the data order restarts at an epoch boundary).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cli import InputError, progress_bar_disabled
from .modeling_ldae import LDAEModel, LDAEPatchPCA, patchify

logger = get_logger(__name__)  # main process only

TOKENIZER_DIR, TRAINING_DIR = "tokenizer", "tokenizer-training"
WEIGHTS_NAME, INFO_NAME = "tokenizer.safetensors", "tokenizer.json"
DEFAULT_KL_WEIGHTS = {"patch_ae": 0.0, "patch_vae": 0.01, "conv_vae": 1e-6}
# The config values a tokenizer's weights depend on: a source must match the model in each.
TOKENIZER_CONFIG_KEYS = ("tokenizer_type", "pca_dim", "patch_size", "num_channels", "conv_vae_block_out_channels")


def tokenizer_prefix(config) -> str:
    return "pca." if config.tokenizer_type in ("pca", "identity") else "tokenizer."


def tokenizer_state(model) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors under their `LDAEModel` names (`pca.*` or `tokenizer.*`)."""
    prefix = tokenizer_prefix(model.config)
    return {k: v.detach().cpu().contiguous() for k, v in model.ldae.state_dict().items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------- artefact


def save_tokenizer(model, output_dir: Path, info: dict[str, Any]) -> Path:
    """Write `<output_dir>/tokenizer/` through a temporary folder renamed into place (never half-written)."""
    folder, temporary = output_dir / TOKENIZER_DIR, output_dir / f".tmp-{TOKENIZER_DIR}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tokenizer_state(model), temporary / WEIGHTS_NAME)
    config = {key: getattr(model.config, key) for key in TOKENIZER_CONFIG_KEYS}
    (temporary / INFO_NAME).write_text(json.dumps({"config": config, **info}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return folder


def load_tokenizer_source(path: str, model, cache_dir: str | None = None, token: str | None = None):
    """(tensors, info) of the tokenizer at `path` (`--tokenizer_from`): a tokenizer folder, a run folder holding one,
    or any l-DAE checkpoint; checked against `model`'s tokenizer settings."""
    flag, folder = "--tokenizer_from", Path(path)
    for candidate in (folder, folder / TOKENIZER_DIR):
        if (candidate / INFO_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            info = json.loads((candidate / INFO_NAME).read_text())
            tensors, saved = load_file(candidate / WEIGHTS_NAME), info["config"]
            break
    else:
        try:
            source = LDAEModel.from_pretrained(path, cache_dir=cache_dir, token=token)
        except (OSError, ValueError) as error:
            raise InputError(f"{flag} {path}: neither a tokenizer folder nor a loadable l-DAE checkpoint "
                             f"({str(error).splitlines()[0]})") from None
        tensors = {k: v for k, v in source.state_dict().items() if k.startswith(tokenizer_prefix(source.config))}
        saved, info = {key: getattr(source.config, key, None) for key in TOKENIZER_CONFIG_KEYS}, {}
        if not source.latent_tokenizer.is_fitted:
            raise InputError(f"{flag} {path}: its tokenizer is not fitted or trained.")
    different = [f"{key} {saved.get(key)!r} (this model: {getattr(model.config, key)!r})"
                 for key in TOKENIZER_CONFIG_KEYS if saved.get(key) != getattr(model.config, key)]
    if different:
        raise InputError(f"{flag} {path}: its tokenizer does not fit this model: {'; '.join(different)}. Take one "
                         "trained with the same tokenizer settings, or drop the flag to fit / train one.")
    return tensors, info


def install_tokenizer(model, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.ldae.load_state_dict(tensors, strict=False)
    prefix = tokenizer_prefix(model.config)
    lacking = [key for key in missing if key.startswith(prefix)]
    if lacking or unexpected:
        raise InputError(f"The tokenizer tensors do not match this model (missing {lacking[:4]}, unexpected "
                         f"{unexpected[:4]}).")


# ---------------------------------------------------------------------------------------------------- training


def reconstruction_loss(tokenizer, images: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training objective, per-pixel MSE): per token the summed squared error of its pixels plus kl_weight x
    KL[N(mean, std^2) | N(0, I)] summed over its d dimensions (VAEs sample the posterior), mean over tokens."""
    mean, std = tokenizer.posterior(images)
    latent = mean if std is None else mean + std * torch.randn_like(mean)
    reconstructed = tokenizer.reconstruct(latent, *images.shape[-2:])
    squared = (reconstructed - images).square()
    per_token = patchify(squared, tokenizer.patch_size).sum(-1)
    if std is not None:
        per_token = per_token + kl_weight * 0.5 * (mean.square() + std.square() - 1 - 2 * std.log()).sum(-1)
    return per_token.mean(), squared.mean().detach()


def train_tokenizer(model, loader, accelerator: Accelerator, output_dir: Path, max_steps: int, learning_rate: float,
                    kl_weight: float, logging_steps: int, save_steps: int | None, seed: int,
                    disable_tqdm: bool | None = None) -> int:
    """Train `model.ldae.tokenizer` for `max_steps` Adam steps (constant learning rate) on `loader`'s images,
    resuming from `<output_dir>/tokenizer-training/`; logs the MSE to `tokenizer-training/metrics.jsonl`. The
    gradients are averaged over processes by hand: the tokenizer is not registered with the accelerator, so
    stage 2's checkpoints hold only the denoiser. Returns the steps trained."""
    tokenizer = model.ldae.tokenizer.requires_grad_(True).train()
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=learning_rate)
    training, step = output_dir / TRAINING_DIR, 0
    if (training / "state.pt").is_file():
        saved = torch.load(training / "state.pt", map_location=accelerator.device, weights_only=True)
        tokenizer.load_state_dict(saved["tokenizer"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
        logger.info("Tokenizer training resumes at step %d of %d.", step, max_steps)
    loader = prepare_data_loader(loader, accelerator.device, accelerator.num_processes, accelerator.process_index,
                                 put_on_device=True, dispatch_batches=False, use_seedable_sampler=True,
                                 data_seed=seed)
    torch.manual_seed(seed + step + accelerator.process_index)  # posterior samples: a stream per process
    bar = tqdm(total=max_steps, initial=step, desc="tokenizer",
               disable=progress_bar_disabled(disable_tqdm, accelerator))
    window = []
    while step < max_steps:
        loader.set_epoch(step)  # a resumed run sees a new data order rather than replaying the first batches
        for batch in loader:
            if step >= max_steps:
                break
            images = batch["pixel_values"].float() if batch is not None else None
            if images is None:
                continue
            loss, mse = reconstruction_loss(tokenizer, images, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if accelerator.num_processes > 1:
                for parameter in tokenizer.parameters():
                    parameter.grad = accelerator.reduce(parameter.grad, "mean")
            optimizer.step()
            step += 1
            window.append(mse)
            bar.update(1)
            if step % logging_steps == 0 or step == max_steps:
                mse = accelerator.reduce(torch.stack(window).mean(), "mean").item()
                window = []
                bar.set_postfix(mse=f"{mse:.4f}", refresh=False)
                if accelerator.is_main_process:
                    training.mkdir(parents=True, exist_ok=True)
                    with (training / "metrics.jsonl").open("a") as file:
                        file.write(json.dumps({"step": step, "reconstruction_mse": mse, "loss": loss.item()}) + "\n")
            if save_steps and step % save_steps == 0 and step < max_steps and accelerator.is_main_process:
                training.mkdir(parents=True, exist_ok=True)
                torch.save({"tokenizer": tokenizer.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                           training / "state.tmp")
                (training / "state.tmp").replace(training / "state.pt")
    bar.close()
    tokenizer.requires_grad_(False).eval()
    accelerator.wait_for_everyone()
    return step


# ---------------------------------------------------------------------------------------------------- figures


@torch.no_grad()
def latent_statistics(tokenizer, images: torch.Tensor, batch_size: int = 64) -> dict[str, Any]:
    """Per-dimension variance of the (scaled) posterior-mean latent over all tokens of `images`, and the per-pixel
    reconstruction MSE from that mean."""
    latents, squared = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].float()
        latent = tokenizer.encode_images(chunk)
        latents.append(latent.reshape(-1, latent.shape[-1]))
        squared.append((tokenizer.decode_images(latent, *chunk.shape[-2:]) - chunk).square().mean() * len(chunk))
    latents = torch.cat(latents)
    return {"variance": latents.var(0), "reconstruction_mse": (sum(squared) / len(images)).item()}


def fit_latent_scale(tokenizer, images: torch.Tensor, pca_eigenvalues: torch.Tensor, dim: int) -> float:
    """Set `latent_scale` so that the mean per-dimension variance of the latent equals the PCA's at the same d."""
    tokenizer.latent_scale.fill_(1.0)
    variance = latent_statistics(tokenizer, images)["variance"]
    scale = math.sqrt(pca_eigenvalues[:dim].double().mean().item() / variance.double().mean().clamp_min(1e-12).item())
    tokenizer.latent_scale.fill_(scale)
    return scale


def describe(tokenizer, images: torch.Tensor, reference_variance: float) -> dict[str, Any]:
    """Held-out figures: reconstruction MSE, per-dimension latent std, and the dimensions whose variance reaches 1%
    of `reference_variance` (the PCA's mean per-dimension variance at this d), the active ones."""
    stats = latent_statistics(tokenizer, images)
    variance = stats["variance"]
    return {"reconstruction_mse": stats["reconstruction_mse"], "latent_std": variance.sqrt().tolist(),
            "active_dimensions": int((variance >= 0.01 * reference_variance).sum()),
            "num_dimensions": len(variance)}


def pca_reference(config, mean, components, eigenvalues, images: torch.Tensor) -> dict[str, Any]:
    """The same figures for the patch PCA at the tokenizer's d (the baseline each learned tokenizer is read
    against)."""
    pca_config = copy.copy(config)
    pca_config.tokenizer_type = "pca"
    pca = LDAEPatchPCA(pca_config)
    pca.set(mean, components, eigenvalues)
    pca.to(images.device)
    return describe(pca, images, eigenvalues[:config.pca_dim].mean().item())


# ---------------------------------------------------------------------------------------------------- stage 1


def prepare_tokenizer(model, source: str | None, fit_pca, make_train_loader, read_images, args,
                      accelerator: Accelerator, output_dir: Path, cache_dir: str | None = None,
                      token: str | None = None) -> tuple[str, dict[str, Any]]:
    """Stage 1: give `model` its tokenizer, from `--tokenizer_from`, from this run's own `tokenizer/` (a restarted
    run), or fitted (`fit_pca()` -> (mean, components, eigenvalues, description)) / trained here on
    `make_train_loader()` and saved as `<output_dir>/tokenizer/`. `read_images(held_out, count)` decodes the images
    for the latent scale (training images) and the figures (held-out ones), only when something is fitted. Returns
    (how, figures) for the log and the card."""
    config = model.config
    own = output_dir / TOKENIZER_DIR
    if source or (own / INFO_NAME).is_file():
        tensors, info = load_tokenizer_source(source or str(own), model, cache_dir, token)
        install_tokenizer(model, tensors)
        return (f"copied from {source}" if source else f"reused from {own}"), info.get("figures", {})
    if config.tokenizer_type == "identity":
        return "the identity (the pixels are the latent)", {}
    mean, components, eigenvalues, how = fit_pca()
    report_images = read_images(True, 256).to(accelerator.device)
    figures = {"pca": pca_reference(config, mean, components, eigenvalues, report_images)}
    if config.tokenizer_type == "pca":
        model.set_pca(mean, components, eigenvalues)
        figures["tokenizer"] = figures["pca"]
    else:
        kl_weight = args.tokenizer_kl_weight
        if kl_weight is None:
            kl_weight = DEFAULT_KL_WEIGHTS[config.tokenizer_type]
        steps = train_tokenizer(model, make_train_loader(), accelerator, output_dir, args.tokenizer_max_steps,
                                args.tokenizer_learning_rate, kl_weight, args.logging_steps, args.save_steps,
                                args.seed, args.disable_tqdm)
        scale = fit_latent_scale(model.ldae.tokenizer, read_images(False, 512).to(accelerator.device), eigenvalues,
                                 config.pca_dim)
        figures["tokenizer"] = describe(model.ldae.tokenizer, report_images, eigenvalues[:config.pca_dim].mean().item())
        figures["training"] = {"steps": steps, "learning_rate": args.tokenizer_learning_rate, "kl_weight": kl_weight,
                               "latent_scale": scale}
        how = f"trained for {steps} steps (KL weight {kl_weight:g}), latent scale {scale:.4g}"
    if accelerator.is_main_process:
        save_tokenizer(model, output_dir, {"how": how, "figures": figures})
    accelerator.wait_for_everyone()
    return how, figures


def log_figures(figures: dict[str, Any], accelerator: Accelerator) -> None:
    """The tokenizer's held-out figures beside the PCA's at the same d, to the log and the trackers."""
    metrics = {}
    for name in ("tokenizer", "pca"):
        if name in figures:
            entry = figures[name]
            std = entry["latent_std"]
            logger.info("%s: held-out reconstruction MSE %.5f, %d of %d dimensions active, latent std %.3f-%.3f.",
                        "Tokenizer" if name == "tokenizer" else "Patch PCA at the same d", entry["reconstruction_mse"],
                        entry["active_dimensions"], entry["num_dimensions"], min(std), max(std))
            metrics.update({f"{name}/reconstruction_mse": entry["reconstruction_mse"],
                            f"{name}/active_dimensions": entry["active_dimensions"]})
    if metrics:
        accelerator.log(metrics, step=0)
