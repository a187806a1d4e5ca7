"""The deconstructive journey as configurations of the same model: schedules, targets, tokenizers, the invalid
combinations, every stage trained / resumed / loaded / fine-tuned by the scripts, and l-DAE itself unchanged
(a checkpoint and a run saved by ldae 0.1.0, before these options existed)."""

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state, write_cifar_subset
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForPreTraining
from transformers.dynamic_module_utils import get_imports

import run_finetune
import run_pretrain
from modeling_ldae import (
    JOURNEY_STAGES,
    LDAEConfig,
    LDAEForImageClassification,
    LDAEForPreTraining,
    LDAEModel,
    LDAENoiseScheduler,
    fit_patch_pca,
    patchify,
)
from modeling_ldae.cli import InputError
from modeling_ldae.modeling_ldae import LDAEConvVAE, LDAEPatchAutoencoder, LDAEPatchPCA
from modeling_ldae.monitors import NoiseBinLosses, TrainingHook
from modeling_ldae.optim import adamw_param_groups
from modeling_ldae.tokenizers import describe, fit_latent_scale, reconstruction_loss

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(image_size=32, patch_size=8, pca_dim=8, hidden_size=32, num_hidden_layers=1, decoder_num_hidden_layers=1,
            num_attention_heads=2)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pca(cifar10_train_images):
    return fit_patch_pca(cifar10_train_images[0].split(128), patch_size=8)


def stage_model(stage: str, pca=None, **overrides) -> LDAEForPreTraining:
    torch.manual_seed(0)
    model = LDAEForPreTraining(LDAEConfig(**{**TINY, **JOURNEY_STAGES[stage], **overrides}))
    if pca is not None and model.config.tokenizer_type == "pca":
        model.set_pca(*pca)
    return model.eval()


# -- schedules and targets -----------------------------------------------------------------------------------------


def noise_levels(timesteps, config):
    return LDAENoiseScheduler.from_config(config).noise_levels(timesteps)


def loss_weights(timesteps, config):
    return LDAENoiseScheduler.from_config(config).loss_weight(timesteps)


@pytest.mark.parametrize("schedule", ["linear_beta", "linear_gamma_squared"])
def test_variance_preserving_schedules_keep_unit_variance_and_their_end_points(schedule):
    config = LDAEConfig(**TINY, noise_schedule=schedule)
    timesteps = torch.arange(config.num_timesteps)
    gamma, sigma = noise_levels(timesteps, config)
    torch.testing.assert_close(gamma.square() + sigma.square(), torch.ones(config.num_timesteps))
    assert (gamma[1:] <= gamma[:-1]).all()
    if schedule == "linear_gamma_squared":  # gamma_t^2 = 1 - (t + 1) / T: just below 1, down to exactly 0
        assert gamma[0].square().item() == pytest.approx(1 - 1 / 1000) and gamma[-1].item() == 0
        torch.testing.assert_close(gamma.square(), 1 - (timesteps + 1) / 1000)
    else:
        assert gamma[0].square().item() == pytest.approx(1 - 1e-4) and gamma[-1].square().item() < 1e-4


@pytest.mark.floor
def test_linear_beta_equals_ddpm_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    config = LDAEConfig(**TINY, noise_schedule="linear_beta")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear")
    gamma, _ = noise_levels(torch.arange(1000), config)
    torch.testing.assert_close(gamma.square(), scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_unscaled_schedule_is_l_dae_and_loss_weights_follow_the_target():
    config = LDAEConfig(**TINY)
    gamma, sigma = noise_levels(torch.tensor([0, 999]), config)
    assert gamma.tolist() == [1, 1] and sigma[0] == 0 and sigma[1].item() == pytest.approx(math.sqrt(2))
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(loss_weights(t, config), 1 / (1 + noise_levels(t, config)[1].square()))
    vp = LDAEConfig(**{**TINY, **JOURNEY_STAGES["4a"]})
    torch.testing.assert_close(loss_weights(t, vp), noise_levels(t, vp)[0].square())  # 4a: lambda = gamma^2
    assert loss_weights(t, LDAEConfig(**{**TINY, **JOURNEY_STAGES["2d"]})).tolist() == [1, 1, 1]  # plain eps MSE


@pytest.mark.parametrize("stage", ["3-patch-pca", "4a", "4b", "4c", "4d", "4e"])
def test_targets_noisy_inputs_and_loss_equal_hand_computed_ones(stage, pca, cifar10_train_images):
    model = stage_model(stage, pca)
    config, (mean, components, _) = model.config, pca
    images = cifar10_train_images[0][:4]
    timesteps = torch.tensor([10, 300, 600, 990])
    noise = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(images, timesteps=timesteps, noise=noise)
    x0 = patchify(images, 8).double()
    basis = components[:8].double()
    z0 = (x0 - mean) @ basis.T
    if config.variance_preserving:
        gamma_squared = 1 - (timesteps.double() + 1) / 1000
        gamma, sigma = gamma_squared.sqrt()[:, None, None], (1 - gamma_squared).sqrt()[:, None, None]
        zt = gamma * z0 + sigma * noise.double()
    else:
        sigma = (timesteps.double() * math.sqrt(2) / 999)[:, None, None]
        zt = z0 + sigma * noise.double()
    torch.testing.assert_close(out.noisy_latents.double(), zt, atol=1e-4, rtol=1e-4)
    expected_target = {
        "epsilon": noise.double(), "latent": z0, "projected_pixels": mean + z0 @ basis, "pixels": x0,
    }["epsilon" if config.prediction_type == "epsilon" else config.denoiser_output]
    torch.testing.assert_close(out.targets.double(), expected_target, atol=1e-4, rtol=1e-4)
    if config.denoiser_input == "pixels":
        torch.testing.assert_close(patchify(out.noisy_pixel_values, 8).double(), mean + zt @ basis, atol=1e-4,
                                   rtol=1e-4)
    else:
        assert out.noisy_pixel_values is None and out.logits.shape == (4, 16, 8)
    error = (expected_target - out.logits.double()).square().sum(-1)
    if config.denoiser_output == "pixels":  # Eq. 4: the residual down-weighted
        latent_error = ((expected_target - out.logits.double()) @ basis.T).square().sum(-1)
        error = 0.1 * error + 0.9 * latent_error
    weight = {"epsilon": torch.ones(4, dtype=torch.float64)}.get(
        config.prediction_type, (1 / (1 + sigma.square()) if not config.variance_preserving else gamma.square())
        .reshape(-1))
    assert out.loss.item() == pytest.approx((weight[:, None] * error).mean().item(), rel=1e-4)


def test_copy_baselines_and_denoised_images_read_each_target(pca, cifar10_train_images):
    images = cifar10_train_images[0][:2]
    timesteps, noise = torch.tensor([100, 700]), torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(4))
    for stage in ("2d", "4b", "4c", "4d", "4e"):
        model = stage_model(stage, pca, tokenizer_type="pca")
        with torch.no_grad():
            out = model(images, timesteps=timesteps, noise=noise)
            copied = model.copy_prediction(out, 32, 32)
            tokenizer = model.ldae.latent_tokenizer
            noisy_images = tokenizer.decode_images(out.noisy_latents, 32, 32)
            # A model predicting the copy of its input "denoises" to its own noisy input.
            out.logits = copied
            torch.testing.assert_close(model.denoised_images(out, 32, 32), noisy_images, atol=1e-4, rtol=1e-4)
        if stage == "4e":
            torch.testing.assert_close(copied, patchify(out.noisy_pixel_values, 8))


def test_every_stage_computes_what_it_did_before_the_scheduler_held_the_schedule():
    """tests/fixtures/make_journey_reference.py wrote what each stage computed when the schedule, target and loss
    weight were still decided inside the model file: the noisy latents, targets, loss, copy baseline, denoised images
    and features stay the same (so the journey's runs stand)."""
    from journey_reference import stage_fingerprints

    expected = json.loads((FIXTURES / "journey-reference.json").read_text())
    assert set(expected) == set(JOURNEY_STAGES)
    for stage, values in expected.items():
        got = stage_fingerprints(stage)
        for name, value in values.items():
            flat = lambda v: [v] if isinstance(v, float) else [v["sum"], v["norm"], *v["first"]]
            torch.testing.assert_close(flat(got[name]), flat(value), rtol=1e-6, atol=1e-6, msg=f"{stage} {name}")


def test_scheduler_tables_are_fp32_buffers_that_survive_casts_and_meta_loading(tmp_path):
    config = LDAEConfig(**{**TINY, **JOURNEY_STAGES["2c"]})
    model = LDAEForPreTraining(config)
    scheduler = model.ldae.noise_scheduler
    assert not any("noise_scheduler" in key for key in model.state_dict())  # derived from the config, never saved
    reference = {name: table.float() for name, table in LDAENoiseScheduler.from_config(config).tables().items()}
    model.to(torch.bfloat16)
    for name, table in reference.items():
        assert getattr(scheduler, name).dtype == torch.float32
        assert torch.equal(getattr(scheduler, name), table), name  # recomputed, not rounded through bf16
    model.float().save_pretrained(tmp_path)
    loaded = LDAEForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16).ldae.noise_scheduler
    for name, table in reference.items():
        assert torch.equal(getattr(loaded, name), table), name


def snr_weightings_case(schedule: dict, prediction_type: str, weighting: str):
    scheduler = LDAENoiseScheduler(**schedule, prediction_type=prediction_type, loss_weighting=weighting)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    gamma, sigma = (v.double() for v in scheduler.noise_levels(timesteps))
    return scheduler, timesteps, gamma, sigma, gamma.square() / sigma.square()


@pytest.mark.parametrize("schedule", [dict(noise_schedule="linear_gamma_squared"), dict(noise_schedule="linear_beta"),
                                      dict(sigma_min=0.032)])
def test_loss_weightings_equal_their_formulas_and_snr_makes_every_loss_the_epsilon_loss(schedule):
    vp = "noise_schedule" in schedule
    for kind in ("sample", "epsilon") + (("v_prediction",) if vp else ()):
        for weighting in ("default", "uniform", "snr", "min_snr"):
            scheduler, t, gamma, sigma, snr = snr_weightings_case(schedule, kind, weighting)
            g = 5.0
            expected = {
                ("sample", "default"): snr / (1 + snr), ("sample", "snr"): snr, ("sample", "min_snr"): snr.clamp(max=g),
                ("epsilon", "min_snr"): (g / snr).clamp(max=1), ("v_prediction", "snr"): snr / (1 + snr),
                ("v_prediction", "min_snr"): snr.clamp(max=g) / (1 + snr),
            }.get((kind, weighting), torch.ones(len(t), dtype=torch.float64))
            torch.testing.assert_close(scheduler.loss_weight(t).double(), expected, rtol=1e-6, atol=0,
                                       msg=f"{kind} {weighting}")
    # With "snr", a prediction of any kind is penalised exactly as the eps it implies is by the epsilon loss.
    generator = torch.Generator().manual_seed(0)
    z0, eps, guess = (torch.randn(6, 4, 8, generator=generator) for _ in range(3))
    steps = torch.tensor([1, 100, 400, 600, 900, 998])
    epsilon = LDAENoiseScheduler(**schedule, prediction_type="epsilon")
    zt = epsilon.add_noise(z0, eps, steps)
    for kind in ("sample",) + (("v_prediction",) if vp else ()):
        scheduler = LDAENoiseScheduler(**schedule, prediction_type=kind, loss_weighting="snr")
        implied_z0 = scheduler.predicted_original(guess, zt, steps)
        gamma, sigma = (v[:, None, None] for v in scheduler.noise_levels(steps))
        implied_eps = (zt - gamma * implied_z0) / sigma
        own = scheduler.loss_weight(steps)[:, None, None] * (scheduler.target(z0, eps, steps) - guess).square()
        torch.testing.assert_close(own.sum((1, 2)), (eps - implied_eps).square().sum((1, 2)), rtol=2e-4, atol=1e-4)


def test_v_prediction_and_unscaled_epsilon_convert_back_to_the_clean_latent():
    generator = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 4, 8, generator=generator), torch.randn(4, 4, 8, generator=generator)
    steps = torch.tensor([0, 300, 700, 998])
    for schedule, kind in ((dict(noise_schedule="linear_gamma_squared"), "v_prediction"),
                           (dict(noise_schedule="linear_beta"), "v_prediction"), (dict(sigma_min=0.032), "epsilon")):
        scheduler = LDAENoiseScheduler(**schedule, prediction_type=kind)
        zt = scheduler.add_noise(z0, eps, steps)
        target = scheduler.target(z0, eps, steps)
        if kind == "v_prediction":
            gamma, sigma = (v[:, None, None] for v in scheduler.noise_levels(steps))
            torch.testing.assert_close(target, gamma * eps - sigma * z0)
        torch.testing.assert_close(scheduler.predicted_original(target, zt, steps), z0, atol=1e-4, rtol=1e-4)
        copy = scheduler.copy_prediction(zt, steps)  # says "z0 = z_t"
        torch.testing.assert_close(scheduler.predicted_original(copy, zt, steps), zt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(JOURNEY_STAGES["4a"], prediction_type="v_prediction"),
    dict(JOURNEY_STAGES["4a"], loss_weighting="snr"),
    dict(JOURNEY_STAGES["4b"], prediction_type="epsilon", sigma_min=0.032),
    dict(JOURNEY_STAGES["4e"], loss_weighting="min_snr", sigma_min=0.032),
    dict(JOURNEY_STAGES["4e"], noise_schedule="linear_gamma_squared"),
])
def test_the_studys_options_train_and_their_copy_baseline_is_the_input(overrides, pca, cifar10_train_images):
    model = LDAEForPreTraining(LDAEConfig(**{**TINY, **overrides}))
    model.set_pca(*pca)
    images = cifar10_train_images[0][:4]
    out = model.train()(images)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.final_layer.linear.weight.grad.abs().sum() > 0  # adaLN-Zero: only the head moves first
    with torch.no_grad():
        out = model.eval()(images, timesteps=torch.tensor([5, 300, 600, 990]))
        copy_loss = model.loss(out.targets, model.copy_prediction(out, 32, 32), out.timesteps)
        out.logits = model.copy_prediction(out, 32, 32)
        noisy = model.ldae.latent_tokenizer.decode_images(out.noisy_latents, 32, 32)
        torch.testing.assert_close(model.denoised_images(out, 32, 32), noisy, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(copy_loss) and copy_loss > 0


def test_noise_bins_are_labelled_in_the_schedules_own_terms():
    unscaled = NoiseBinLosses(LDAEConfig(**TINY), every=1).names
    assert unscaled == ["loss_by_sigma/0.00-0.35", "loss_by_sigma/0.35-0.71", "loss_by_sigma/0.71-1.06",
                        "loss_by_sigma/1.06-1.41"]
    vp = NoiseBinLosses(LDAEConfig(**{**TINY, **JOURNEY_STAGES["2d"]}), every=1).names
    assert vp == ["loss_by_gamma_squared/0.999-0.749", "loss_by_gamma_squared/0.749-0.499",
                  "loss_by_gamma_squared/0.499-0.249", "loss_by_gamma_squared/0.249-0"]


# -- invalid combinations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field, valid", [
    (dict(tokenizer_type="patch_ae"), "denoiser_output", "'projected_pixels' or 'latent'"),
    (dict(tokenizer_type="conv_vae"), "denoiser_output", "tokenizer_type in ('pca', 'identity')"),
    (dict(noise_schedule="linear_beta", single_noise_level=0.5), "single_noise_level", "None with noise_schedule"),
    (dict(noise_schedule="linear_gamma_squared", sigma_max=2.0), "sigma_max", "its default sqrt(2)"),
    (dict(prediction_type="epsilon", denoiser_output="latent"), "sigma_min",
     "> 0 with prediction_type='epsilon' and noise_schedule='linear_sigma'"),
    (dict(prediction_type="epsilon", noise_schedule="linear_beta"), "denoiser_output", "'latent'"),
    (dict(tokenizer_type="patch_vae", denoiser_output="latent", feature_input="noisy"), "feature_input", "'clean'"),
    (dict(tokenizer_type="identity"), "pca_dim", "D = 192"),
    (dict(tokenizer_type="conv_vae", pca_dim=6, denoiser_output="latent"), "pca_dim", "a multiple of 4"),
    (dict(noise_schedule="cosine"), "noise_schedule", "('linear_sigma', 'linear_beta', 'linear_gamma_squared')"),
    (dict(prediction_type="x0"), "prediction_type", "('sample', 'epsilon', 'v_prediction')"),
    (dict(prediction_type="v_prediction"), "denoiser_output", "'latent' with prediction_type='v_prediction'"),
    (dict(prediction_type="v_prediction", denoiser_output="latent"), "noise_schedule",
     "'linear_beta' or 'linear_gamma_squared' with prediction_type='v_prediction'"),
    (dict(loss_weighting="p2"), "loss_weighting", "('default', 'uniform', 'snr', 'min_snr')"),
    (dict(loss_weighting="snr"), "sigma_min", "> 0 with loss_weighting='snr' and noise_schedule='linear_sigma'"),
    (dict(noise_schedule="linear_beta", sigma_min=0.1), "sigma_min", "its default 0"),
    (dict(sigma_min=2.0), "sigma_min", "a number in .0, sigma_max"),
    (dict(loss_weighting="min_snr", snr_gamma=0), "snr_gamma", "a number > 0"),
    (dict(adaln_init="normal"), "adaln_init", "('zero', 'xavier')"),
])
def test_invalid_combinations_name_the_valid_choices(overrides, field, valid):
    with pytest.raises(ValueError, match=rf"`{field}`.*{valid.replace('(', '[(]').replace(')', '[)]')}"):
        LDAEConfig(**{**TINY, **overrides})


def test_pixel_dae_and_every_stage_stay_valid():
    LDAEConfig(**{**TINY, "pca_dim": 192})  # the pixel DAE: d = D with the default residual weight
    for stage in JOURNEY_STAGES:
        LDAEConfig.from_preset("ldae-tiny", journey_stage=stage)
    with pytest.raises(ValueError, match="journey stage '5a'"):
        LDAEConfig.from_preset("ldae-tiny", journey_stage="5a")


# -- tokenizers ------------------------------------------------------------------------------------------------------


def test_pca_and_identity_round_trips_are_exact_at_full_dimension(pca, cifar10_train_images):
    images = cifar10_train_images[0][:8]
    full = LDAEPatchPCA(LDAEConfig(**{**TINY, "pca_dim": 192}))
    full.set(*pca)
    identity = LDAEModel(LDAEConfig(**{**TINY, "pca_dim": 192, "tokenizer_type": "identity"})).latent_tokenizer
    assert identity.is_fitted
    for tokenizer in (full, identity):
        tokens = tokenizer.encode_images(images)
        assert tokens.shape == (8, 16, 192)
        torch.testing.assert_close(tokenizer.decode_images(tokens, 32, 32), images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(identity.encode_images(images), patchify(images, 8))


@pytest.mark.parametrize("tokenizer_type", ["patch_ae", "patch_vae", "conv_vae"])
def test_learned_tokenizers_learn_on_real_images_and_scale_to_the_pca_variance(tokenizer_type, pca,
                                                                              cifar10_train_images):
    config = LDAEConfig(**{**TINY, "tokenizer_type": tokenizer_type, "denoiser_output": "latent"})
    torch.manual_seed(0)
    tokenizer = LDAEModel(config).tokenizer
    assert isinstance(tokenizer, LDAEConvVAE if tokenizer_type == "conv_vae" else LDAEPatchAutoencoder)
    assert not tokenizer.is_fitted and not any(p.requires_grad for p in tokenizer.parameters())
    tokenizer.requires_grad_(True)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    images = cifar10_train_images[0][:256]
    losses = []
    for step in range(12):
        loss, mse = reconstruction_loss(tokenizer, images[step % 4 * 64:(step % 4 + 1) * 64], kl_weight=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mse.item())
    assert losses[-1] < 0.8 * losses[0]
    tokenizer.requires_grad_(False)
    scale = fit_latent_scale(tokenizer, images, pca[2], config.pca_dim)
    assert scale > 0 and tokenizer.is_fitted
    figures = describe(tokenizer, images, pca[2][:8].mean().item())
    mean_variance = sum(std**2 for std in figures["latent_std"]) / 8
    assert mean_variance == pytest.approx(pca[2][:8].mean().item(), rel=1e-3)
    tokens = tokenizer.encode_images(images[:4])
    assert tokens.shape == (4, 16, 8) and tokenizer.decode_images(tokens, 32, 32).shape == (4, 3, 32, 32)


def test_tokenizer_is_frozen_fp32_and_outside_optimizers_and_counts():
    model = LDAEForPreTraining(LDAEConfig(**{**TINY, "tokenizer_type": "patch_vae", "denoiser_output": "latent"}))
    tokenizer_ids = {id(p) for p in model.ldae.tokenizer.parameters()}
    assert tokenizer_ids and not any(id(p) in tokenizer_ids for group in adamw_param_groups(model, 0.05)
                                     for p in group["params"])
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.ldae.tokenizer.parameters())
    assert model.num_parameters(only_trainable=True) == total - frozen
    model.to(torch.bfloat16)
    assert model.ldae.tokenizer.encoder.weight.dtype == torch.float32
    assert model.ldae.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16


def test_conv_vae_without_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        LDAEModel(LDAEConfig(**{**TINY, **JOURNEY_STAGES["2d"]}))


def test_remote_code_needs_only_torch_and_transformers_outside_the_conv_vae():
    modeling = Path(LDAEModel.__module__.replace(".", "/") + ".py")
    # transformers' own reading of what a remote-code file needs (it skips imports guarded by try / except).
    imports = set(get_imports(Path(__file__).parents[1] / modeling)) - set(sys.stdlib_module_names)
    assert imports == {"torch", "transformers"}


def test_a_checkpoint_without_its_tokenizer_does_not_load(tmp_path):
    model = LDAEForPreTraining(LDAEConfig(**{**TINY, "tokenizer_type": "patch_ae", "denoiser_output": "latent"}))
    model.ldae.tokenizer.latent_scale.fill_(1.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".tokenizer." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks backbone tensors that LDAEModel needs: tokenizer\.decoder\.bias"):
        LDAEModel.from_pretrained(tmp_path)


# -- every stage through the scripts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journey_data(cifar10_dir, tmp_path_factory) -> Path:
    return write_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("journey_data"), 64, 32)


def pretrain_argv(data: Path, output_dir: Path, *extra) -> list[str]:
    return [str(a) for a in [
        "--model_preset", "ldae-tiny", "--config_overrides",
        "hidden_size=32,num_attention_heads=2,num_hidden_layers=1,decoder_num_hidden_layers=1",
        "--train_dir", data, "--output_dir", output_dir, "--per_device_train_batch_size", 16,
        "--dataloader_num_workers", 0, "--learning_rate", 1e-3, "--lr_scheduler_type", "constant", "--warmup_steps", 0,
        "--pca_num_images", 64, "--pca_num_patches", 1024, "--logging_steps", 2, "--monitor_steps", 2,
        "--num_monitor_images", 4, "--save_steps", 2, "--tokenizer_max_steps", 4, "--seed", 0, *extra]]


class SignalAt(TrainingHook):
    def __init__(self, step):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


@pytest.fixture(scope="module")
def conv_vae_tokenizer(journey_data, tmp_path_factory) -> Path:
    """A conv-VAE tokenizer trained for 4 steps by `--tokenizer_only`, shared by the conv-VAE stages."""
    output_dir = tmp_path_factory.mktemp("conv_vae") / "out"
    argv = pretrain_argv(journey_data, output_dir, "--journey_stage", "2d", "--tokenizer_only")
    assert run_pretrain.main(argv) is None
    reset_accelerate_state()
    return output_dir


@pytest.mark.parametrize("stage", [s for s in JOURNEY_STAGES if s not in ("3-conv-vae", "4e")])
def test_each_stage_trains_resumes_loads_and_fine_tunes(stage, journey_data, conv_vae_tokenizer, tmp_path):
    output_dir = tmp_path / "out"
    extra = ["--journey_stage", stage]
    if JOURNEY_STAGES[stage]["tokenizer_type"] == "conv_vae":
        extra += ["--tokenizer_from", conv_vae_tokenizer]
    argv = pretrain_argv(journey_data, output_dir, *extra, "--max_steps", 4)
    with pytest.raises(SystemExit):  # pre-empted after step 1: the processes agree to stop and checkpoint at step 2
        run_pretrain.main(argv, hooks=[SignalAt(1)])
    assert (output_dir / "checkpoint-2").is_dir() and not (output_dir / "config.json").exists()
    reset_accelerate_state()
    state = run_pretrain.main([*argv, "--resume_from_checkpoint", "latest"])
    assert state.step == 4 and json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    metrics = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"monitor/loss", "monitor/copy_loss"} <= set(metrics[-1]) and (output_dir / "denoising").is_dir()
    config = LDAEConfig.from_pretrained(output_dir)
    assert {key: getattr(config, key) for key in JOURNEY_STAGES[stage]} == JOURNEY_STAGES[stage]
    card = (output_dir / "README.md").read_text()
    assert "not l-DAE itself" in card
    assert ("needs `diffusers`" in card) == (config.tokenizer_type == "conv_vae")
    encoder = AutoModel.from_pretrained(output_dir)
    assert type(encoder) is LDAEModel and encoder.latent_tokenizer.is_fitted
    pretraining = AutoModelForPreTraining.from_pretrained(output_dir)
    torch.testing.assert_close(pretraining.ldae.latent_tokenizer.state_dict(),
                               encoder.latent_tokenizer.state_dict())
    reset_accelerate_state()
    results = run_finetune.main([
        "--model_name_or_path", str(output_dir), "--dataset_name", str(journey_data),
        "--output_dir", str(tmp_path / "finetune"), "--do_train", "--do_eval", "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "32", "--num_train_epochs", "1", "--warmup_epochs", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        "--seed", "0"])
    assert "eval_top1" in results
    finetuned = LDAEForImageClassification.from_pretrained(tmp_path / "finetune")
    # The tokenizer went through fine-tuning untouched (frozen); the token projection was trained (a linear tokenizer
    # is folded into it by the merge: compare with the merged encoder's).
    torch.testing.assert_close(finetuned.ldae.latent_tokenizer.state_dict(), encoder.latent_tokenizer.state_dict())
    merged = encoder.merge_time_conditioning()
    assert finetuned.config.denoiser_input == merged.config.denoiser_input
    assert not torch.equal(finetuned.ldae.embeddings.projection.weight, merged.embeddings.projection.weight)


def test_tokenizer_from_checks_the_settings_and_the_old_flag_still_works(journey_data, conv_vae_tokenizer, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_pretrain.main(pretrain_argv(journey_data, tmp_path / "out", "--journey_stage", "2d", "--config_overrides",
                                        "pca_dim=16", "--tokenizer_from", conv_vae_tokenizer, "--max_steps", 1))
    assert exit_info.value.code == 2
    args = run_pretrain.parse_args(["--pca_from", str(conv_vae_tokenizer), "--output_dir", "x"])
    assert args[0].tokenizer_from == str(conv_vae_tokenizer)


# -- l-DAE unchanged --------------------------------------------------------------------------------------------------


def ldae_0_1_0_checkpoint(folder: Path) -> Path:
    """ldae 0.1.0's tiny checkpoint (its config as 0.1.0 saved it, its state-dict names and shapes) with seeded
    weights, written to `folder`; tests/fixtures/make_ldae_0_1_0_tiny.py ran 0.1.0's code on the same weights."""
    fixture = FIXTURES / "ldae-0.1.0-tiny"
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in json.loads((fixture / "weights.json").read_text()).items():
        # non-zero everywhere (adaLN-Zero starts at zero), so the outputs depend on every weight
        weights[name] = torch.randn(shape, generator=generator) * 0.05
    patch_dim = weights["ldae.pca.mean"].numel()
    basis, _ = torch.linalg.qr(torch.randn(patch_dim, patch_dim, generator=generator, dtype=torch.float64))
    weights["ldae.pca.components"] = basis.T.float().contiguous()  # the PCA must be orthonormal
    weights["ldae.pca.eigenvalues"] = torch.linspace(2, 0.01, patch_dim)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(fixture / name, folder / name)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def ldae_0_1_0_inputs():
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(2, 4, 8, generator=generator)
    return pixels, torch.tensor([10, 700]), noise


def test_a_checkpoint_saved_by_ldae_0_1_0_gives_the_same_outputs(tmp_path):
    folder = ldae_0_1_0_checkpoint(tmp_path / "ldae-0.1.0-tiny")
    expected = json.loads((FIXTURES / "ldae-0.1.0-tiny" / "expected_outputs.json").read_text())
    pixels, timesteps, noise = ldae_0_1_0_inputs()
    with torch.no_grad():
        out = LDAEForPreTraining.from_pretrained(folder).eval()(pixels, timesteps=timesteps, noise=noise)
        features = AutoModel.from_pretrained(folder).eval()(pixels).pooler_output
    computed = {"loss": out.loss, "logits": out.logits, "noisy_pixel_values": out.noisy_pixel_values,
                "pooler_output": features}
    for name, value in computed.items():
        torch.testing.assert_close(value, torch.tensor(expected[name]), rtol=1e-6, atol=1e-6, msg=name)


# 0.1.0 trained from the init it actually applied (xavier adaLN and final layer, a transformers 5 custom-code skip);
# `adaln_init=xavier` reproduces it, so today's code must still retrace 0.1.0's run step for step.
LDAE_0_1_0_RUN = ["--model_preset", "ldae-tiny", "--config_overrides", "hidden_size=32,num_attention_heads=2,"
                  "num_hidden_layers=1,decoder_num_hidden_layers=1,frequency_embedding_size=32,adaln_init=xavier",
                  "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--base_learning_rate",
                  "2e-3", "--warmup_steps", "1", "--pca_num_images", "64", "--pca_num_patches", "1024",
                  "--logging_steps", "1", "--monitor_steps", "0", "--seed", "0", "--max_steps", "4",
                  "--save_steps", "2"]


def test_a_run_saved_by_ldae_0_1_0_resumes_to_the_same_model(cifar10_dir, tmp_path):
    """tests/fixtures/make_ldae_0_1_0_run.py ran these 4 steps under 0.1.0 and kept its step-2 checkpoint's JSON
    files and a fingerprint of its final weights. Today's code must save the same state at step 2, accept 0.1.0's
    saved config (which lacks every journey key) on resume, and end where 0.1.0 ended."""
    old = FIXTURES / "ldae-0.1.0-run"
    data = write_cifar_subset(cifar10_dir, tmp_path / "data", 64, 16)
    run_pretrain.main([*LDAE_0_1_0_RUN, "--train_dir", str(data), "--output_dir", str(tmp_path / "today")])
    today = tmp_path / "today" / "checkpoint-2"
    old_state = json.loads((old / "checkpoint-2" / "trainer_state.json").read_text())
    today_state = json.loads((today / "trainer_state.json").read_text())
    assert "tokenizer_type" not in old_state["model_config"] and "noise_schedule" not in old_state["model_config"]
    assert today_state["step"] == old_state["step"] and today_state["positions"] == old_state["positions"]
    assert today_state["last_loss"] == pytest.approx(old_state["last_loss"], rel=1e-6)
    optimizer = torch.load(today / "optimizer.bin", weights_only=True)
    old_groups = json.loads((old / "checkpoint-2" / "optimizer_param_groups.json").read_text())
    assert json.loads(json.dumps(optimizer["param_groups"])) == old_groups  # the same tensors, settings and lr
    scheduler = torch.load(today / "scheduler.bin", weights_only=True)
    assert json.loads(json.dumps(scheduler)) == json.loads((old / "checkpoint-2" / "scheduler.json").read_text())

    # The same step-2 checkpoint as 0.1.0 left it on disk: its config files, without the journey keys.
    output_dir = tmp_path / "run"
    shutil.copytree(today, output_dir / "checkpoint-2")
    for name in ("trainer_state.json", "config.json", "preprocessor_config.json"):
        shutil.copy(old / "checkpoint-2" / name, output_dir / "checkpoint-2" / name)
    run_pretrain.main([*LDAE_0_1_0_RUN, "--train_dir", str(data), "--output_dir", str(output_dir),
                       "--resume_from_checkpoint", "latest"])
    resumed = load_file(output_dir / "model.safetensors")
    fingerprint = json.loads((old / "final_weights.json").read_text())
    assert resumed.keys() == fingerprint.keys()
    for key, expected in fingerprint.items():
        torch.testing.assert_close(resumed[key].norm().item(), expected["norm"], atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(resumed[key].flatten()[:4].tolist(), expected["first"], atol=1e-6, rtol=1e-5,
                                   msg=key)


def test_input_error_for_a_stage_on_another_model_type(tmp_path):
    with pytest.raises(InputError, match="--journey_stage applies to l-DAE models"):
        run_pretrain.check_arguments(run_pretrain.parse_args(
            ["--model_type", "vit_mae", "--journey_stage", "4a", "--output_dir", str(tmp_path)])[0],
            run_pretrain.parse_args(["--output_dir", str(tmp_path)])[2])


def test_tokenizer_training_resumes_and_is_reused_by_the_run_that_follows(journey_data, tmp_path, caplog):
    output_dir = tmp_path / "out"
    argv = pretrain_argv(journey_data, output_dir, "--journey_stage", "3-patch-vae", "--save_steps", 1)
    run_pretrain.main([*argv, "--tokenizer_only", "--tokenizer_max_steps", "2"])
    first = json.loads((output_dir / "tokenizer" / "tokenizer.json").read_text())
    assert first["figures"]["training"]["steps"] == 2 and first["figures"]["tokenizer"]["num_dimensions"] == 8
    assert first["figures"]["pca"]["reconstruction_mse"] < first["figures"]["tokenizer"]["reconstruction_mse"]
    # As if stage 1 had been killed after its step-1 save: the next run resumes there instead of starting over.
    shutil.rmtree(output_dir / "tokenizer")
    reset_accelerate_state()
    with caplog.at_level("INFO"):
        run_pretrain.main([*argv, "--tokenizer_only", "--tokenizer_max_steps", "4"])
    assert "Tokenizer training resumes at step 1 of 4." in caplog.text
    logged = [json.loads(line)["step"] for line in (output_dir / "tokenizer-training" / "metrics.jsonl").open()]
    assert logged == [2, 2, 4]
    trained = load_file(output_dir / "tokenizer" / "tokenizer.safetensors")
    reset_accelerate_state()
    with caplog.at_level("INFO"):
        run_pretrain.main([*argv, "--max_steps", "1"])
    assert f"Tokenizer (patch_vae) reused from {output_dir / 'tokenizer'}." in caplog.text
    final = AutoModel.from_pretrained(output_dir).latent_tokenizer.state_dict()
    assert all(torch.equal(final[k.removeprefix("tokenizer.")], v) for k, v in trained.items())
