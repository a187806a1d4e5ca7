"""The noise schedule, the training target and the loss weight of l-DAE and every stage of its journey, in one place.

Shaped like `diffusers`' schedulers (`add_noise(original_samples, noise, timesteps)`, `get_velocity`, a
`prediction_type`), but written here: `save_pretrained` copies this file beside the model file for remote code, so
it imports only torch, and a training step looks its tables up instead of recomputing them. Every choice (schedule,
prediction type, loss weighting) is made once, when the tables are built.

Notation: z_t = gamma_t z_0 + sigma_t eps, SNR_t = gamma_t^2 / sigma_t^2 (of the schedule, not of the data).
"""

import math

import torch
from torch import nn


class LDAENoiseScheduler(nn.Module):
    """Tables of gamma_t, sigma_t and the loss weight lambda_t for t in [0, T), computed once in float64 and kept as
    fp32 buffers. They are not saved (the config says everything), stay fp32 when the model is cast to bf16, and are
    rebuilt by `reset_tables` after meta-device loading.

    Schedules: "linear_sigma" (l-DAE: gamma = 1, sigma linear from `sigma_min` to `sigma_max`), "linear_beta" (DDPM's
    linear betas; gamma^2 = `DDPMScheduler.alphas_cumprod`) and "linear_gamma_squared" (gamma^2 = 1 - (t + 1) / T);
    the last two are variance-preserving. Loss weightings, each the factor on the squared error of the prediction:
    "default" (clean-sample targets SNR / (1 + SNR), i.e. 1 / (1 + sigma^2) for l-DAE and gamma^2 for a
    variance-preserving schedule; epsilon and v: 1), "uniform" (1), "snr" (the weight that makes the loss the epsilon
    loss: sample SNR, v SNR / (1 + SNR), epsilon 1) and "min_snr" (Hang et al. 2023, with `snr_gamma`: sample
    min(SNR, g), epsilon min(1, g / SNR), v min(SNR, g) / (1 + SNR))."""

    def __init__(self, num_timesteps: int = 1000, noise_schedule: str = "linear_sigma", sigma_min: float = 0.0,
                 sigma_max: float = math.sqrt(2), beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction_type: str = "sample", loss_weighting: str = "default", snr_gamma: float = 5.0):
        super().__init__()
        self.num_timesteps, self.noise_schedule, self.prediction_type = num_timesteps, noise_schedule, prediction_type
        self.sigma_min, self.sigma_max, self.beta_start, self.beta_end = sigma_min, sigma_max, beta_start, beta_end
        self.loss_weighting, self.snr_gamma = loss_weighting, snr_gamma
        for name in ("gammas", "sigmas", "loss_weights"):
            self.register_buffer(name, torch.empty(num_timesteps, dtype=torch.float32), persistent=False)
        self.reset_tables()

    @classmethod
    def from_config(cls, config) -> "LDAENoiseScheduler":
        return cls(**{name: getattr(config, name) for name in (
            "num_timesteps", "noise_schedule", "sigma_min", "sigma_max", "beta_start", "beta_end", "prediction_type",
            "loss_weighting", "snr_gamma")})

    @property
    def variance_preserving(self) -> bool:
        return self.noise_schedule != "linear_sigma"

    # -- the tables ---------------------------------------------------------------------------------------------------

    def tables(self) -> dict[str, torch.Tensor]:
        """gamma_t, sigma_t and lambda_t in float64, on the CPU."""
        steps = torch.arange(self.num_timesteps, dtype=torch.float64)
        if self.noise_schedule == "linear_sigma":
            sigmas = self.sigma_min + (self.sigma_max - self.sigma_min) * steps / (self.num_timesteps - 1)
            gammas = torch.ones_like(sigmas)
        else:
            if self.noise_schedule == "linear_beta":
                betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
                gamma_squared = torch.cumprod(1 - betas, dim=0)
            else:  # the paper gives no offset; this one ends at gamma = 0
                gamma_squared = 1 - (steps + 1) / self.num_timesteps
            gammas, sigmas = gamma_squared.sqrt(), (1 - gamma_squared).sqrt()
        return {"gammas": gammas, "sigmas": sigmas, "loss_weights": self.weights(gammas.square() / sigmas.square())}

    def weights(self, snr: torch.Tensor) -> torch.Tensor:
        """lambda_t from SNR_t (inf where sigma = 0, 0 where gamma = 0)."""
        kind, weighting, g = self.prediction_type, self.loss_weighting, self.snr_gamma
        if weighting == "uniform" or (weighting in ("default", "snr") and kind == "epsilon"):
            return torch.ones_like(snr)
        if weighting == "default":
            return torch.ones_like(snr) if kind == "v_prediction" else 1 / (1 + 1 / snr)  # SNR / (1 + SNR), inf-safe
        if weighting == "snr":
            return snr if kind == "sample" else snr / (1 + snr)
        clipped = snr.clamp(max=g)
        return {"sample": clipped, "epsilon": (g / snr).clamp(max=1), "v_prediction": clipped / (1 + snr)}[kind]

    @torch.no_grad()
    def reset_tables(self):
        for name, table in self.tables().items():
            getattr(self, name).copy_(table)

    def _apply(self, fn, *args, **kwargs):
        # `model.to(torch.bfloat16)` casts every floating buffer; the tables stay fp32 (bf16 would round l-DAE's
        # sigma_10 = 0.014) and only follow the device: recomputed, not cast back, so nothing is lost on the way.
        super()._apply(fn, *args, **kwargs)
        if any(buffer.dtype != torch.float32 for buffer in self._buffers.values()):
            for name, buffer in self._buffers.items():
                self._buffers[name] = torch.empty(buffer.shape, dtype=torch.float32, device=buffer.device)
            self.reset_tables()
        return self

    # -- per-example values -------------------------------------------------------------------------------------------

    def noise_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma_t, sigma_t), fp32, of the shape of `timesteps`."""
        return self.gammas[timesteps], self.sigmas[timesteps]

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.loss_weights[timesteps]

    def timestep_of_sigma(self, sigma: float) -> int:
        """The step whose sigma is nearest (the single-noise-level ablation)."""
        return int((self.sigmas - sigma).abs().argmin())

    def _levels(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, sigma = self.noise_levels(timesteps)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return gamma.reshape(shape), sigma.reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = gamma_t z_0 + sigma_t eps, batch first, fp32."""
        gamma, sigma = self._levels(timesteps, original_samples)
        if not self.variance_preserving:  # gamma = 1: no multiply, l-DAE's step as lean as before
            return original_samples + sigma * noise
        return gamma * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = gamma_t eps - sigma_t z_0 (Salimans & Ho), as `diffusers` defines it."""
        gamma, sigma = self._levels(timesteps, sample)
        return gamma * noise - sigma * sample

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the prediction is trained towards: `clean` itself (the clean latent, or an image target), eps, or v."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(clean, noise, timesteps)
        return clean

    def predicted_original(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor):
        """Any prediction turned into the clean latent z_0 it implies (eps: (z_t - sigma eps) / gamma, gamma clamped at
        1e-3 where a schedule ends at 0; v: gamma z_t - sigma v)."""
        if self.prediction_type == "sample":
            return prediction
        gamma, sigma = self._levels(timesteps, noisy)
        if self.prediction_type == "epsilon":
            return (noisy - sigma * prediction) / gamma.clamp_min(1e-3)
        return gamma * noisy - sigma * prediction

    def copy_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The prediction that says "z_0 = z_t", in the target's terms (a model that learned only to copy its input);
        for an image target the caller decodes it."""
        if self.prediction_type == "sample":
            return noisy
        gamma, sigma = self._levels(timesteps, noisy)
        if self.prediction_type == "epsilon":
            return noisy * ((1 - gamma) / sigma)
        return noisy * ((gamma - 1) / sigma)
