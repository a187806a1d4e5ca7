"""l-DAE: latent Denoising Autoencoder (Chen, Liu, Xie, He, "Deconstructing Denoising Diffusion Models for
Self-Supervised Learning").

Read top to bottom, this file follows the data: patches -> fixed patch-wise PCA tokenizer -> noise added in the
PCA latent -> back to pixels -> DiT-style ViT blocks with adaLN-Zero time conditioning (encoder = the first
`num_hidden_layers` blocks of one stack, decoder = the rest) -> heads (clean-image prediction for pre-training,
average-pooled encoder features, classifiers) -> the backbone for dense heads (feature maps, ViTDet's pyramid).
The paper's deconstructive journey lives in the same path as config values (`configuration_ldae.JOURNEY_STAGES`):
other tokenizers (identity, patch AE / VAE, conv VAE), variance-preserving schedules, latent tokens as input,
epsilon or latent targets.

`save_pretrained` copies this file for `trust_remote_code`, so it imports only torch and transformers: the small
layers timm would give (MLP, drop path) are written here, as transformers' single-file policy does. The one
exception, diffusers' `AutoencoderKL` for the conv-VAE tokenizer, is imported only when such a model is built.
"""

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvNextImageProcessor, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import IMAGE_PROCESSOR_NAME, ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_ldae import LDAEConfig
from .scheduling_ldae import LDAENoiseScheduler

logger = logging.get_logger(__name__)


def _value_checks_enabled() -> bool:
    # Data-dependent checks would break `torch.compile(fullgraph=True)`; shape checks stay on (they are static).
    return not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------
# Patches and tokenizers: the fixed patch PCA (l-DAE), the identity, and the journey's learned ones
# ----------------------------------------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in row-major order, values ordered (row, column, channel)."""
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    batch, _, patch_dim = patches.shape
    channels = patch_dim // (patch_size * patch_size)
    grid_h, grid_w = height // patch_size, width // patch_size
    pixels = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    return pixels.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


class LDAEFloat32Module(nn.Module):
    """A tokenizer stays fp32 whatever the model dtype (at t = 10, sigma = 0.014 is below bf16 rounding of pixels):
    `model.to(torch.bfloat16)` casts every floating tensor, and rounding would already lose the small noise levels,
    so the originals are kept and only the device move applies."""

    def _apply(self, fn, *args, **kwargs):
        originals = {name: tensor.data for name, tensor in [*self.named_parameters(), *self.named_buffers()]}
        super()._apply(fn, *args, **kwargs)
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            original = originals[name]
            if tensor.dtype != original.dtype:
                restored = original.to(device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = restored
                else:
                    owner, _, attribute = name.rpartition(".")
                    self.get_submodule(owner)._buffers[attribute] = restored
        return self

    def require_fitted(self, purpose: str):
        if _value_checks_enabled() and not self.is_fitted:
            raise ValueError(f"{purpose} needs a fitted {self.kind}, but this model's {self.unfitted}.")


class LDAEPatchPCA(LDAEFloat32Module):
    """The fixed patch-wise PCA: mean mu (D), orthonormal basis V_full (D x D, rows by descending eigenvalue) and the
    eigenvalues; all-zero eigenvalues mean "not fitted". With `tokenizer_type="identity"` it starts as the identity
    (mu = 0, V = I, d = D: the latent is the pixels) and needs no fit."""

    kind = "PCA tokenizer"
    unfitted = ("PCA is not fitted (all-zero eigenvalues). Fit one with `modeling_ldae.fit_patch_pca(...)` and call "
                "`model.set_pca(mean, components, eigenvalues)`, or load a checkpoint that has one")

    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.pca_dim, self.patch_size = config.pca_dim, config.patch_size
        dim = config.patch_dim
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("components", torch.eye(dim, dtype=torch.float32))
        self.register_buffer("eigenvalues", torch.full((dim,), float(config.tokenizer_type == "identity")))

    @property
    def is_fitted(self) -> bool:
        return bool(self.eigenvalues.abs().sum() > 0)

    @torch.no_grad()
    def set(self, mean: torch.Tensor, components: torch.Tensor, eigenvalues: torch.Tensor):
        dim = self.mean.shape[0]
        mean, components, eigenvalues = (torch.as_tensor(t, dtype=torch.float64) for t in (mean, components, eigenvalues))
        for name, value, shape in (("mean", mean, (dim,)), ("components", components, (dim, dim)),
                                   ("eigenvalues", eigenvalues, (dim,))):
            if tuple(value.shape) != shape:
                raise ValueError(f"set_pca: `{name}` has shape {tuple(value.shape)}, expected {shape} (D = {dim}).")
            if not torch.isfinite(value).all():
                raise ValueError(f"set_pca: `{name}` contains NaN or inf values.")
        error = (components @ components.T - torch.eye(dim, dtype=torch.float64)).abs().max().item()
        if error > 1e-4:
            raise ValueError(
                f"set_pca: `components` is not orthonormal (max |V V^T - I| = {error:.2e}, expected < 1e-4): pass "
                "the full D x D eigenvector matrix, one component per row."
            )
        if (eigenvalues < -1e-6).any() or (eigenvalues[1:] > eigenvalues[:-1] + 1e-9).any() or eigenvalues.sum() <= 0:
            raise ValueError("set_pca: `eigenvalues` must be non-negative, not all zero, and sorted descending "
                             "(components ordered to match).")
        self.mean.copy_(mean)
        self.components.copy_(components)
        self.eigenvalues.copy_(eigenvalues)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """z = V (x - mu), the top-d latent."""
        return (patches - self.mean) @ self.components[: self.pca_dim].T

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse PCA mu + V^T z: the PCA residual (I - V^T V)(x - mu) is not recovered."""
        return self.mean + latent @ self.components[: self.pca_dim]

    # The tokenizer interface, shared with the learned tokenizers below: images <-> (batch, tokens, d).

    def encode_images(self, pixel_values: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return self.encode(patchify(pixel_values, self.patch_size))

    def decode_images(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpatchify(self.decode(tokens), self.patch_size, height, width)


class LDAELearnedTokenizer(LDAEFloat32Module):
    """The base of the trained tokenizers (stage 3 of the journey): an encoder posterior N(mean, std^2) per token
    (std None: a plain autoencoder) and a decoder, trained before denoising (`modeling_ldae.tokenizers`), then
    frozen. `latent_scale` (one scalar, fitted after training; 0 = not trained) makes the mean per-dimension
    variance of the latent equal the PCA's at the same d, so that a noise level means the same for every
    tokenizer. The denoiser trains on posterior samples (as DiT does on its VAE) and is evaluated on the mean."""

    kind = "learned tokenizer"
    unfitted = ("tokenizer is not trained (latent_scale 0). Train it with run_pretrain.py (stage 1, or "
                "--tokenizer_from a run that trained one), or load a checkpoint that has one")

    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.register_buffer("latent_scale", torch.zeros((), dtype=torch.float32))

    @property
    def is_fitted(self) -> bool:
        return bool(self.latent_scale > 0)

    def posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of the unscaled latent tokens, each (batch, tokens, d); std is None for an autoencoder."""
        raise NotImplementedError

    def reconstruct(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unscaled latent tokens -> images."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        mean, std = self.posterior(pixel_values)
        if sample and std is not None:
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * self.latent_scale

    def decode_images(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.reconstruct(tokens / self.latent_scale, height, width)


class LDAEPatchAutoencoder(LDAELearnedTokenizer):
    """Patch-wise linear AE, x -> V x + b -> U^T z + c (U, V of d x D), or, with `variational`, a patch-wise VAE
    whose posterior is N(V x + b, diag sigma^2) with one learned sigma per latent dimension."""

    def __init__(self, config: LDAEConfig, variational: bool):
        super().__init__(config)
        self.encoder = nn.Linear(config.patch_dim, config.pca_dim)
        self.decoder = nn.Linear(config.pca_dim, config.patch_dim)
        self.log_std = nn.Parameter(torch.zeros(config.pca_dim)) if variational else None

    def posterior(self, pixel_values):
        mean = self.encoder(patchify(pixel_values, self.patch_size))
        return mean, None if self.log_std is None else self.log_std.exp().expand_as(mean)

    def reconstruct(self, latent, height, width):
        return unpatchify(self.decoder(latent), self.patch_size, height, width)


class LDAEConvVAE(LDAELearnedTokenizer):
    """A convolutional VAE, `diffusers`' `AutoencoderKL` (MSE + KL, no perceptual or GAN loss: the journey's 2c),
    with stride patch_size / 2 and d / 4 latent channels; each token is a 2 x 2 latent patch, as DiT patchifies
    its VAE latent, so the token grid equals the patch grid of the other tokenizers."""

    def __init__(self, config: LDAEConfig):
        super().__init__(config)
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("This l-DAE model's tokenizer is a convolutional VAE (tokenizer_type='conv_vae'), "
                              "built on diffusers' AutoencoderKL: install it with `pip install diffusers` (or "
                              "`pip install 'ldae[diffusers]'`).") from None
        widths = config.conv_vae_widths
        self.vae = AutoencoderKL(
            in_channels=config.num_channels, out_channels=config.num_channels,
            down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=tuple(widths), layers_per_block=1, latent_channels=config.pca_dim // 4,
            norm_num_groups=min(32, widths[0]), sample_size=config.image_size, scaling_factor=1.0,
            mid_block_add_attention=False,  # convolutions only: the small latents of the study need no attention
        )

    def posterior(self, pixel_values):
        distribution = self.vae.encode(pixel_values).latent_dist
        return patchify(distribution.mean, 2), patchify(distribution.std, 2)

    def reconstruct(self, latent, height, width):
        stride = self.patch_size // 2
        return self.vae.decode(unpatchify(latent, 2, height // stride, width // stride)).sample


def make_tokenizer(config: LDAEConfig) -> LDAEFloat32Module:
    if config.tokenizer_type in ("pca", "identity"):
        return LDAEPatchPCA(config)
    if config.tokenizer_type == "conv_vae":
        return LDAEConvVAE(config)
    return LDAEPatchAutoencoder(config, variational=config.tokenizer_type == "patch_vae")


# ----------------------------------------------------------------------------------------------------------------
# Noise, added in the latent: z_t = gamma_t z_0 + sigma_t eps. l-DAE: no signal scaling (gamma_t = 1), sigma_t linear
# from 0 to sigma_max over T steps. The journey's earlier stages: variance-preserving schedules, gamma^2 + sigma^2 = 1.
# The schedule, the target and the loss weight live in `scheduling_ldae.LDAENoiseScheduler`; here, the time embedding.
# ----------------------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding of integer timesteps, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LDAETimestepEmbedder(nn.Module):
    """t -> conditioning vector c of width `time_embed_dim` (h / 4 in the paper, to save adaLN parameters)."""

    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.frequency_embedding_size = config.frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(config.frequency_embedding_size, config.time_embed_dim),
            nn.SiLU(),
            nn.Linear(config.time_embed_dim, config.time_embed_dim),
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_embedding(timesteps, self.frequency_embedding_size)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Embeddings and blocks
# ----------------------------------------------------------------------------------------------------------------


def sincos_position_embeddings(hidden_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE / DiT), (1, grid_h * grid_w, hidden_size); computed for any grid."""
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    out_w, out_h = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return table.float().unsqueeze(0)


class LDAEEmbeddings(nn.Module):
    """Token projection plus fixed sin-cos positions; no class token. The tokens are image patches (the patch
    projection, l-DAE) or, with `denoiser_input="latent"`, the d-dim latent tokens (a linear projection)."""

    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.config = config
        if config.denoiser_input == "latent":
            self.latent_embeddings = nn.Linear(config.pca_dim, config.hidden_size)
        else:
            self.patch_embeddings = nn.Conv2d(
                config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
            )
        grid = config.image_size // config.patch_size
        # Not saved, so any resolution loads; `_init_weights` recomputes it after meta-device loading, and it holds
        # the table from the start, so a model built with weight initialisation skipped has it too.
        self.register_buffer(
            "position_embeddings", sincos_position_embeddings(config.hidden_size, grid, grid), persistent=False
        )

    @property
    def projection(self) -> nn.Module:
        return self.latent_embeddings if self.config.denoiser_input == "latent" else self.patch_embeddings

    def forward(self, inputs: torch.Tensor, grid_h: int | None = None, grid_w: int | None = None) -> torch.Tensor:
        """`inputs`: images (batch, C, H, W), or latent tokens (batch, grid_h * grid_w, d) on a grid of
        `grid_h` x `grid_w` tokens (default: the configured image size's)."""
        grid = self.config.image_size // self.config.patch_size
        if self.config.denoiser_input == "latent":
            embeddings = self.latent_embeddings(inputs.to(self.latent_embeddings.weight.dtype))
            grid_h, grid_w = grid_h or grid, grid_w or grid
        else:
            embeddings = self.patch_embeddings(inputs.to(self.patch_embeddings.weight.dtype))
            grid_h, grid_w = embeddings.shape[-2:]
            embeddings = embeddings.flatten(2).transpose(1, 2)
        # Sin-cos positions are a function of the grid: recompute them exactly instead of interpolating. Also always
        # while tracing (torch.export, torch.compile): comparing the grid with the cached table's would pin the graph
        # to one image size.
        if torch.compiler.is_compiling() or (grid_h, grid_w) != (grid, grid):
            positions = sincos_position_embeddings(self.config.hidden_size, grid_h, grid_w).to(embeddings)
        else:
            positions = self.position_embeddings.to(embeddings.dtype)
        return embeddings + positions


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention on (batch, heads, length, head_dim) tensors, returning the weights too. `attention_mask` is
    part of the attention-interface signature; l-DAE attends over all patches, so it is always None."""
    weights = ((query * scaling) @ key.transpose(-2, -1)).softmax(dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2), weights


class LDAEAttention(nn.Module):
    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by transformers' SDPA / flex wrappers: every patch attends to every patch
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, **kwargs):
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        # SDPA and flex attention return no weights: a call that asks for them runs eager, never returns None.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, weights = attention(self, query, key, value, None, dropout=self.dropout if self.training else 0.0,
                                     scaling=self.scaling, **kwargs)
        return self.proj(context.reshape(batch, length, width)), weights


class LDAEMlp(nn.Module):
    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class LDAEDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample, scaled by 1 / keep while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return hidden_states
        keep = 1 - self.rate
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
        return hidden_states * mask.div_(keep)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # One fused op instead of a multiply and an add over every token (measurable on CPU).
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class LDAEBlock(GradientCheckpointingLayer):
    """DiT block with adaLN-Zero: per-block shift / scale / gate from c for attention and MLP. After
    `merge_time_conditioning()` the constants live in affine LayerNorms and the output projections, and the block is
    a plain pre-norm ViT block."""

    def __init__(self, config: LDAEConfig, drop_path: float = 0.0):
        super().__init__()
        merged = config.time_conditioning_merged
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=merged)
        self.attention = LDAEAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=merged)
        self.mlp = LDAEMlp(config)
        self.drop_path = LDAEDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.adaLN_modulation = None if merged else nn.Sequential(
            nn.SiLU(), nn.Linear(config.time_embed_dim, 6 * config.hidden_size)
        )

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor | None, **kwargs) -> torch.Tensor:
        if self.adaLN_modulation is None:
            attention_output, _ = self.attention(self.norm1(hidden_states), **kwargs)
            hidden_states = hidden_states + self.drop_path(attention_output)
            return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(conditioning).chunk(6, -1)
        attention_output, _ = self.attention(modulate(self.norm1(hidden_states), shift_msa, scale_msa), **kwargs)
        # The per-sample drop-path mask commutes with the gate, so the gated residual is one fused addcmul.
        hidden_states = torch.addcmul(hidden_states, gate_msa.unsqueeze(1), self.drop_path(attention_output))
        mlp_output = self.mlp(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return torch.addcmul(hidden_states, gate_mlp.unsqueeze(1), self.drop_path(mlp_output))

    @torch.no_grad()
    def merge_time_conditioning(self, conditioning: torch.Tensor, layer_norm_eps: float):
        """Fold the constants of one conditioning vector c (shape (time_embed_dim,)) into the block, exactly."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(conditioning[None]).float()[0].chunk(6)
        )
        for name, shift, scale in (("norm1", shift_msa, scale_msa), ("norm2", shift_mlp, scale_mlp)):
            old = getattr(self, name)
            norm = nn.LayerNorm(old.normalized_shape, eps=layer_norm_eps).to(conditioning.device)
            norm.weight.copy_(1 + scale)
            norm.bias.copy_(shift)
            setattr(self, name, norm.to(self.attention.proj.weight.dtype))
        for linear, gate in ((self.attention.proj, gate_msa), (self.mlp.fc2, gate_mlp)):
            linear.weight.copy_(linear.weight.float() * gate[:, None])
            linear.bias.copy_(linear.bias.float() * gate)
        self.adaLN_modulation = None


class LDAEFinalLayer(nn.Module):
    """adaLN LayerNorm + Linear to each token's prediction: its p * p * C pixels, or its d latent values (DiT's final
    layer)."""

    def __init__(self, config: LDAEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, 2 * config.hidden_size))
        self.linear = nn.Linear(config.hidden_size, config.output_dim)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(conditioning).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(hidden_states), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# Outputs, the image processor and the pre-trained model base
# ----------------------------------------------------------------------------------------------------------------


def make_image_processor(image_size: int, crop_pct: float = 0.875) -> ConvNextImageProcessor:
    """The evaluation transform saved with every checkpoint: short side to image_size / crop_pct, center crop,
    bicubic, pixels to [-1, 1] (`modeling_ldae.data.eval_transform` reproduces it for training scripts). Needs Pillow,
    imported here: the model itself, also as remote code, needs only torch and transformers."""
    from transformers.image_utils import PILImageResampling

    return ConvNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_pct=crop_pct,
        resample=PILImageResampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@dataclass
class LDAEForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): lambda_t-weighted squared error per token, mean over tokens and batch
        (fp32); for l-DAE the paper's Eq. 4, residual components down-weighted.
    logits (`torch.FloatTensor` of shape `(batch_size, num_patches, config.output_dim)`):
        the prediction per token: clean patches for l-DAE (see `modeling_ldae.unpatchify` for images), else per
        `config.denoiser_output` and `config.prediction_type` (`LDAEForPreTraining.denoised_images` turns any of
        them into images).
    noisy_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
        the network input mu + V^T (V (x - mu) + sigma_t * eps), as an image; None when the network takes latent
        tokens (`denoiser_input="latent"`).
    timesteps (`torch.LongTensor` of shape `(batch_size,)`): the t of each example.
    targets (`torch.FloatTensor` of the shape of `logits`): what `logits` is trained towards (fp32).
    noisy_latents (`torch.FloatTensor` of shape `(batch_size, num_patches, pca_dim)`): z_t = gamma_t z_0 + sigma_t eps.
    hidden_states, attentions: as in every `transformers` model, one entry per block (plus the embeddings).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    noisy_pixel_values: torch.FloatTensor | None = None
    timesteps: torch.LongTensor | None = None
    targets: torch.FloatTensor | None = None
    noisy_latents: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class LDAEPreTrainedModel(PreTrainedModel):
    config_class = LDAEConfig
    base_model_prefix = "ldae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Declared only for what the tests run (eager is always there); flash attention is not tested, so not declared.
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = ["LDAEBlock"]
    # `_keep_in_fp32_modules_strict` is declared per instance by `LDAEModel`: only the tokenizer it holds.
    # Hidden states = the embeddings, then every block's output; attentions = each block's weights.
    _can_record_outputs = {"hidden_states": LDAEBlock, "attentions": LDAEAttention}

    def _initialize_weights(self, module, *args, **kwargs):
        # transformers treats every class defined outside its own package as custom code, and for custom code it
        # marks a module with no parameters of its own as initialised without calling `_init_weights`: every
        # container branch below (adaLN-Zero, the time MLP, the final layer, the classifier head) would be skipped
        # and its children would keep the generic xavier init. That skip guards code that writes loaded tensors in
        # place; every init here goes through `transformers.initialization`, which leaves loaded tensors alone.
        super()._initialize_weights(module)

    def _init_weights(self, module):
        """DiT's initialisation: xavier linears, zero adaLN-Zero and final layer, normal(0.02) time MLP, fixed
        sin-cos positions; MAE's trunc-normal classifier heads. `adaln_init="xavier"` keeps the conditioning path and
        the final layer xavier, as ldae <= 0.1 initialised them."""
        std = self.config.initializer_range
        dit_init = self.config.adaln_init == "zero"
        if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            # The probe head's running statistics: a pre-training checkpoint lacks them, and from_pretrained would
            # leave them as uninitialised memory.
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, LDAEEmbeddings):
            # DiT: xavier-uniform of the projection seen as a (hidden, C * p * p) matrix. Bound computed here because
            # init on a view would bypass the loaded-tensor guard of `transformers.initialization`.
            weight = module.projection.weight
            bound = math.sqrt(6.0 / (weight.shape[0] + weight[0].numel()))
            init.uniform_(weight, -bound, bound)
            init.zeros_(module.projection.bias)
            grid_h = grid_w = self.config.image_size // self.config.patch_size
            init.copy_(module.position_embeddings, sincos_position_embeddings(self.config.hidden_size, grid_h, grid_w))
        elif isinstance(module, LDAEPatchPCA):
            init.zeros_(module.mean)
            init.eye_(module.components)
            # The identity tokenizer is "fitted" from the start; a PCA is not until `set_pca`.
            (init.ones_ if self.config.tokenizer_type == "identity" else init.zeros_)(module.eigenvalues)
        elif isinstance(module, LDAELearnedTokenizer):
            init.zeros_(module.latent_scale)  # not trained
            if getattr(module, "log_std", None) is not None:
                init.zeros_(module.log_std)
        elif isinstance(module, LDAENoiseScheduler):
            module.reset_tables()  # not saved: after meta-device loading the tables are uninitialised memory
        elif isinstance(module, LDAETimestepEmbedder) and dit_init:
            init.normal_(module.mlp[0].weight, std=std)
            init.normal_(module.mlp[2].weight, std=std)
        elif isinstance(module, (LDAEBlock, LDAEFinalLayer)) and module.adaLN_modulation is not None and dit_init:
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)
        if isinstance(module, LDAEFinalLayer) and dit_init:
            init.zeros_(module.linear.weight)
            init.zeros_(module.linear.bias)
        elif isinstance(module, LDAEForImageClassification):
            head_std = 0.01 if self.config.classifier_head == "linear_probe" else 2e-5  # MAE's probe / fine-tune
            init.trunc_normal_(module.classifier.weight, std=head_std)
            init.zeros_(module.classifier.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.embeddings.projection

    def merge_time_conditioning(self, timestep: int | None = None):
        """See `LDAEModel.merge_time_conditioning`; the fine-tuning and export form of the encoder."""
        self.base_model.merge_time_conditioning(timestep)
        self._replace_config(self.base_model.config)  # the copy the encoder merged on, for the head too
        return self

    def _replace_config(self, config: LDAEConfig):
        """Give this model and every submodule that shares its config `config` instead. Models built from one
        config share the object: one that changes its config (merging) first takes a copy, so that the caller's
        config and every other model built from it stay as they were."""
        shared = self.config
        for module in self.modules():
            if getattr(module, "config", None) is shared:
                module.config = config

    def set_pca(self, mean: torch.Tensor, components: torch.Tensor, eigenvalues: torch.Tensor):
        """Install a fitted PCA tokenizer (from `fit_patch_pca`): mean (D,), components (D, D) as orthonormal rows
        sorted by the descending eigenvalues (D,). May be called again to replace it."""
        if self.config.tokenizer_type != "pca":
            raise ValueError(f"set_pca: this model's tokenizer is {self.config.tokenizer_type!r}, not a PCA: "
                             "learned tokenizers are trained by run_pretrain.py's stage 1, the identity needs none.")
        self.base_model.pca.set(mean, components, eigenvalues)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` writes `auto_map` for the saved class only; name every head so any Auto class
        # loads the checkpoint with `trust_remote_code=True`.
        self.config.auto_map = {
            "AutoConfig": "configuration_ldae.LDAEConfig",
            "AutoModel": "modeling_ldae.LDAEModel",
            "AutoModelForPreTraining": "modeling_ldae.LDAEForPreTraining",
            "AutoModelForImageClassification": "modeling_ldae.LDAEForImageClassification",
            "AutoBackbone": "modeling_ldae.LDAEBackbone",
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # A checkpoint is usable by AutoImageProcessor and the pipelines on its own: add the evaluation processor
        # unless the caller saved one (the scripts do, to the same effect).
        if kwargs.get("is_main_process", True) and not (Path(save_directory) / IMAGE_PROCESSOR_NAME).exists():
            try:
                processor = make_image_processor(self.config.image_size)
            except ImportError:  # no Pillow: the model is saved, only the processor is left out
                logger.warning(f"Pillow is not installed: {save_directory} holds the model without its image "
                               "processor (`pip install pillow` to save one).")
            else:
                processor.save_pretrained(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers would silently re-initialise missing tensors; a backbone without its weights or PCA is a broken
        # checkpoint, so refuse. Missing decoder blocks or heads stay warnings (new heads are expected).
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # Loading puts new Parameters in place, which forget `requires_grad_(False)`: freeze the tokenizer again.
        model.base_model.latent_tokenizer.requires_grad_(False)
        required = sorted(key for key in info["missing_keys"] if model._is_backbone_key(key))
        if required:
            shown = ", ".join(required[:8]) + (f" and {len(required) - 8} more" if len(required) > 8 else "")
            raise ValueError(
                f"The checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')!r} lacks backbone "
                f"tensors that {cls.__name__} needs: {shown}. It was saved by a different model (or with fewer "
                "encoder blocks than `num_hidden_layers`); load a complete l-DAE checkpoint."
            )
        return (model, info) if return_info else model

    def _is_backbone_key(self, key: str) -> bool:
        name = key.removeprefix(f"{self.base_model_prefix}.")
        if name.startswith(("pca.", "tokenizer.", "embeddings.", "time_embedder.")):
            return True
        if name.startswith("blocks."):
            return int(name.split(".")[1]) < self.config.num_hidden_layers
        return False


# ----------------------------------------------------------------------------------------------------------------
# The backbone: encoder (and, for pre-training, the decoder) on one stack of blocks
# ----------------------------------------------------------------------------------------------------------------


class LDAEModel(LDAEPreTrainedModel):
    """The l-DAE representation: the encoder blocks at a fixed t on the clean image, average-pooled."""

    def __init__(self, config: LDAEConfig, add_decoder: bool = False):
        super().__init__(config)
        self.config = config
        # The PCA keeps its `ldae.pca.*` names (checkpoints of every version load); learned tokenizers are
        # `ldae.tokenizer.*`, frozen: never in an optimizer, a layer-decay group or a parameter count.
        if config.tokenizer_type in ("pca", "identity"):
            self.pca = make_tokenizer(config)
            self._keep_in_fp32_modules_strict = ["pca"]
        else:
            self.tokenizer = make_tokenizer(config).requires_grad_(False)
            self._keep_in_fp32_modules_strict = ["tokenizer"]
        self.noise_scheduler = LDAENoiseScheduler.from_config(config)
        self.embeddings = LDAEEmbeddings(config)
        self.time_embedder = None if config.time_conditioning_merged else LDAETimestepEmbedder(config)
        depth = config.num_hidden_layers + (config.decoder_num_hidden_layers if add_decoder else 0)
        # On the CPU explicitly: the rates are Python floats, also when the model is built under a meta-device context.
        rates = torch.linspace(0, config.drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([LDAEBlock(config, rate) for rate in rates])
        self.gradient_checkpointing = False
        if not add_decoder:
            # Features come from pre-training checkpoints: their decoder blocks and pixel head are unused by design,
            # so transformers should not report them as unexpected.
            encoder_blocks = "|".join(str(i) for i in range(config.num_hidden_layers))
            self._keys_to_ignore_on_load_unexpected = [r"(^|\.)final_layer\.",
                                                       rf"(^|\.)blocks\.(?!(?:{encoder_blocks})\.)\d+\."]
        self.post_init()

    # -- inputs ---------------------------------------------------------------------------------------------------

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool):
        config = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"`pixel_values` has shape {tuple(pixel_values.shape)}, expected (batch, {config.num_channels}, "
                "height, width): the channel count must match `config.num_channels`."
            )
        height, width = pixel_values.shape[-2:]
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"`pixel_values` is {height}x{width}, expected a size divisible by patch_size {config.patch_size}."
            )
        if not interpolate_pos_encoding and (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"`pixel_values` is {height}x{width} but the model was configured for {config.image_size}x"
                f"{config.image_size}: resize the images, or pass `interpolate_pos_encoding=True`."
            )

    def resolve_timesteps(self, timesteps, batch_size: int, device: torch.device) -> torch.Tensor:
        """An int, a (batch,) integer tensor or None (-> `feature_timestep`) -> (batch,) long tensor, checked."""
        config = self.config
        if config.time_conditioning_merged:
            if timesteps is not None:
                raise ValueError(
                    f"`timesteps` = {timesteps!r}, but this model's time conditioning was merged at t = "
                    f"{config.merged_timestep}: it cannot be conditioned on another t; pass timesteps=None."
                )
            timesteps = config.merged_timestep
        if timesteps is None:
            timesteps = config.feature_timestep
        if isinstance(timesteps, int):
            timesteps = torch.full((batch_size,), timesteps, dtype=torch.long, device=device)
        if timesteps.is_floating_point() or timesteps.shape not in ((batch_size,), ()):
            raise ValueError(
                f"`timesteps` has shape {tuple(timesteps.shape)} and dtype {timesteps.dtype}, expected integers "
                f"of shape ({batch_size},) in [0, {config.num_timesteps})."
            )
        timesteps = timesteps.to(device=device, dtype=torch.long).expand(batch_size)
        if _value_checks_enabled() and ((timesteps < 0) | (timesteps >= config.num_timesteps)).any():
            raise ValueError(
                f"`timesteps` = {timesteps.tolist()} out of range: expected integers in [0, {config.num_timesteps})."
            )
        return timesteps

    @property
    def latent_tokenizer(self) -> LDAEFloat32Module:
        """The tokenizer, whichever it is (`self.pca` for the PCA and the identity, else `self.tokenizer`)."""
        return self.pca if self.config.tokenizer_type in ("pca", "identity") else self.tokenizer

    def add_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise=None, generator=None):
        """z_t = gamma_t z_0 + sigma_t eps on (batch, tokens, d) latents, fp32. Returns (z_t, eps)."""
        expected = tuple(latents.shape)
        if noise is None:
            noise = torch.randn(expected, generator=generator, device=latents.device, dtype=torch.float32)
        elif tuple(noise.shape) != expected:
            raise ValueError(f"`noise` has shape {tuple(noise.shape)}, expected (batch, num_patches, pca_dim) = "
                             f"{expected}.")
        return self.noise_scheduler.add_noise(latents, noise.float(), timesteps), noise.float()

    def add_latent_noise(self, pixel_values, timesteps, noise=None, generator=None):
        """Images -> noisy images in the tokenizer's latent: x_t = mu + V^T (gamma_t V (x - mu) + sigma_t eps) for
        the PCA. Returns (x_t as patches, x0 patches), fp32 with autocast off."""
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            pixel_values = pixel_values.float()
            tokenizer, (height, width) = self.latent_tokenizer, pixel_values.shape[-2:]
            noisy, _ = self.add_noise(tokenizer.encode_images(pixel_values), timesteps, noise, generator)
            noisy = tokenizer.decode_images(noisy, height, width)
        return patchify(noisy, self.config.patch_size), patchify(pixel_values, self.config.patch_size)

    def feature_input(self, pixel_values, timesteps, noise=None):
        """What the encoder sees for features: the clean image (or, for a latent-space denoiser, its latent tokens,
        the posterior mean), its PCA projection, or latent-noised at t."""
        config, mode = self.config, self.config.feature_input
        if mode == "clean" and config.denoiser_input == "pixels":
            return pixel_values
        tokenizer = self.latent_tokenizer
        tokenizer.require_fitted(f"feature_input={mode!r}" if mode != "clean" else "A latent-space denoiser")
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            latents = tokenizer.encode_images(pixel_values.float())
            if mode == "noisy":
                # Fixed-seed noise in eval mode keeps features deterministic (fresh noise while training).
                generator = None
                if not self.training and noise is None:
                    generator = torch.Generator(device=pixel_values.device).manual_seed(0)
                latents, _ = self.add_noise(latents, timesteps, noise, generator)
            if config.denoiser_input == "latent":
                return latents
            return tokenizer.decode_images(latents, *pixel_values.shape[-2:]).to(pixel_values.dtype)

    def embed(self, inputs: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = (size // self.config.patch_size for size in pixel_values.shape[-2:])
        return self.embeddings(inputs, grid_h, grid_w)

    # -- blocks ---------------------------------------------------------------------------------------------------

    def conditioning(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return None if self.time_embedder is None else self.time_embedder(timesteps)

    def run_blocks(self, hidden_states, conditioning, blocks, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """The blocks in order; `capture_outputs` on the calling forward records hidden states and attentions."""
        # As `capture_outputs` decides what to record: the call's flag, else the config's.
        kwargs["output_attentions"] = kwargs.get("output_attentions", self.config.output_attentions)
        for block in blocks:
            hidden_states = block(hidden_states, conditioning, **kwargs)
        return hidden_states

    @capture_outputs
    def forward(
        self,
        pixel_values: torch.Tensor,
        timesteps: torch.Tensor | int | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images in [-1, 1].
        timesteps (`int` or `torch.LongTensor` of shape `(batch_size,)`, *optional*):
            t to condition the encoder on; defaults to `config.feature_timestep` (10).
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches, pca_dim)`, *optional*):
            latent noise for `feature_input="noisy"` (otherwise sampled; fixed seed in eval mode).

        The input is the clean image (at `feature_timestep`), or its latent tokens for a latent-space denoiser.
        Returns `last_hidden_state` (the encoder output, no extra norm) and `pooler_output` (its mean over patches).
        """
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        timesteps = self.resolve_timesteps(timesteps, pixel_values.shape[0], pixel_values.device)
        hidden_states = self.embed(self.feature_input(pixel_values, timesteps, noise), pixel_values)
        hidden_states = self.run_blocks(hidden_states, self.conditioning(timesteps),
                                        self.blocks[: self.config.num_hidden_layers], **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states.mean(dim=1))

    @torch.no_grad()
    def merge_time_conditioning(self, timestep: int | None = None) -> "LDAEModel":
        """Fold the adaLN constants of a fixed t (default `feature_timestep`) into plain LayerNorm affines and the
        attention-output / fc2 weights: exactly the same outputs, now a plain pre-norm ViT (ViT parameter counts).
        The config records it (`time_conditioning_merged`, `merged_timestep`), so it saves and loads as such."""
        config = self.config
        if config.time_conditioning_merged:
            raise ValueError(f"The time conditioning is already merged (at t = {config.merged_timestep}).")
        if len(self.blocks) > config.num_hidden_layers:
            raise ValueError("merge_time_conditioning() applies to the encoder; this model also holds the decoder "
                             "(LDAEForPreTraining). Load the checkpoint with LDAEModel or a classifier first.")
        self._replace_config(copy.deepcopy(config))
        config = self.config
        timestep = config.feature_timestep if timestep is None else timestep
        device = self.embeddings.projection.weight.device
        conditioning = self.time_embedder(self.resolve_timesteps(timestep, 1, device)).float()[0]
        for block in self.blocks:
            block.merge_time_conditioning(conditioning, config.layer_norm_eps)
        self.time_embedder = None
        config.time_conditioning_merged = True
        config.merged_timestep = timestep
        return self.fold_tokenizer()  # and a linear tokenizer in front of the blocks joins the patch embedding

    @torch.no_grad()
    def fold_tokenizer(self) -> "LDAEModel":
        """Fold a linear tokenizer in front of a merged encoder into a patch embedding, so that it takes images as
        they are, with the same outputs (fp32 rounding). The latent tokens of the PCA, V (x - mu), of the patch AE and
        of the patch VAE's posterior mean, s (E x + e), are an affine map of each patch, z = M x + c, and so is the PCA
        projection of `feature_input="pca"`, mu + V^T V (x - mu): the token embedding W, b after it (a Linear of the
        latent, or the patch convolution) becomes the patch convolution W M, b + W c.

        The config then says what the forward pass does, `denoiser_input="pixels"`, `feature_input="clean"`, so the
        checkpoint loads as the ViT it now is, also with versions of this file that predate the fold (no new key to
        ignore); the tokenizer stays in it, unused, the record of the latent the encoder was trained on (its tensors
        are required keys on loading). A conv VAE's latent and `feature_input="noisy"` are not linear maps of the
        patch: left as they are."""
        config = self.config
        if not config.time_conditioning_merged:
            raise ValueError("fold_tokenizer() applies to a merged encoder (the input an unmerged model trains on is "
                             "part of pre-training): call merge_time_conditioning(), which folds it too.")
        tokenizer = self.latent_tokenizer
        if config.feature_input == "noisy" or (config.denoiser_input, config.feature_input) == ("pixels", "clean"):
            return self
        # Per patch, in float64 and in `patchify`'s (row, column, channel) order: what the token projection sees,
        # matrix @ x + offset.
        if isinstance(tokenizer, LDAEPatchPCA):
            tokenizer.require_fitted("Folding the tokenizer into the patch embedding")
            basis, mean = tokenizer.components[: tokenizer.pca_dim].double(), tokenizer.mean.double()
            matrix, offset = basis, -basis @ mean
            if config.denoiser_input == "pixels":  # feature_input="pca": the image decoded back, mu + V^T z
                matrix, offset = basis.T @ matrix, mean + basis.T @ offset
        elif isinstance(tokenizer, LDAEPatchAutoencoder):
            tokenizer.require_fitted("Folding the tokenizer into the patch embedding")
            scale = tokenizer.latent_scale.double()
            matrix, offset = scale * tokenizer.encoder.weight.double(), scale * tokenizer.encoder.bias.double()
        else:
            return self
        projection, patch, channels = self.embeddings.projection, config.patch_size, config.num_channels
        weight = projection.weight.double()
        if config.denoiser_input == "pixels":  # a Conv2d weight is (out, C, p, p): to patchify's order
            weight = weight.permute(0, 2, 3, 1).flatten(1)
        patch_embeddings = nn.Conv2d(channels, config.hidden_size, kernel_size=patch, stride=patch,
                                     device=projection.weight.device, dtype=projection.weight.dtype)
        patch_embeddings.weight.copy_((weight @ matrix).reshape(-1, patch, patch, channels).permute(0, 3, 1, 2))
        patch_embeddings.bias.copy_(projection.bias.double() + weight @ offset)
        patch_embeddings.requires_grad_(projection.weight.requires_grad)
        if config.denoiser_input == "latent":
            del self.embeddings.latent_embeddings
        self.embeddings.patch_embeddings = patch_embeddings
        config.denoiser_input, config.feature_input = "pixels", "clean"
        return self


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


class LDAEForPreTraining(LDAEPreTrainedModel):
    """l-DAE pre-training: denoise images whose noise was added in the PCA latent; predict the clean image. At the
    journey's other stages: noise in another tokenizer's latent, variance-preserving schedules, latent tokens in,
    eps or the clean latent out (`config.prediction_type`, `denoiser_input`, `denoiser_output`)."""

    def __init__(self, config: LDAEConfig):
        super().__init__(config)
        if config.time_conditioning_merged:
            raise ValueError("LDAEForPreTraining needs time conditioning, but this config was merged at a fixed t.")
        self.ldae = LDAEModel(config, add_decoder=True)
        self.final_layer = LDAEFinalLayer(config)
        self.post_init()

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        config = self.config
        if config.single_noise_level is not None:
            # Single-level ablation: the schedule step nearest to the requested sigma.
            step = self.ldae.noise_scheduler.timestep_of_sigma(config.single_noise_level)
            return torch.full((batch_size,), step, dtype=torch.long, device=device)
        return torch.randint(0, config.num_timesteps, (batch_size,), device=device)

    def loss(self, targets: torch.Tensor, predicted: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """lambda_t (the scheduler's `loss_weight`) times the squared error per token, mean over tokens and batch, in
        fp32.

        For the original-image target (`denoiser_output="pixels"`, l-DAE) the squared error is Eq. 4's:
        sum_i w_i r_i^2 with r = V_full e, e = x0 - prediction, w_i = 1 for the top d components and
        `residual_loss_weight` for the rest. As V_full is orthonormal, sum_i w_i r_i^2 = w |e|^2 + (1 - w) |V e|^2:
        one d-wide projection instead of a D x D one. Every other target: the plain sum of squares per token."""
        config = self.config
        with torch.autocast(device_type=targets.device.type, enabled=False):
            error = targets - predicted.float()
            per_token = error.square().sum(-1)
            if config.denoiser_output == "pixels":
                pca, weight = self.ldae.pca, config.residual_loss_weight
                latent_error = error @ pca.components[: pca.pca_dim].T
                per_token = weight * per_token + (1 - weight) * latent_error.square().sum(-1)
            return (self.ldae.noise_scheduler.loss_weight(timesteps)[:, None] * per_token).mean()

    def targets(self, pixel_values: torch.Tensor, clean_latents: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """What the prediction is trained towards, per token: from the clean latent z_0, eps or v (the scheduler's
        `target`); else the tokenizer's reconstruction of the clean image (4d: mu + V^T V (x0 - mu) for the PCA) or
        the original image (l-DAE)."""
        config = self.config
        if config.denoiser_output == "latent":
            return self.ldae.noise_scheduler.target(clean_latents, noise, timesteps)
        if config.denoiser_output == "projected_pixels":
            pixel_values = self.ldae.latent_tokenizer.decode_images(clean_latents, *pixel_values.shape[-2:])
        return patchify(pixel_values, config.patch_size)

    def copy_prediction(self, outputs: LDAEForPreTrainingOutput, height: int, width: int) -> torch.Tensor:
        """The prediction of a model that learned nothing but to copy its input, in the target's terms: the noisy
        image (image targets), z_t (latent), or the eps / v that says "z_0 = z_t". A trained model's loss must fall
        well below this one's (the health monitor)."""
        copy = self.ldae.noise_scheduler.copy_prediction(outputs.noisy_latents, outputs.timesteps)
        if self.config.denoiser_output == "latent":
            return copy
        return patchify(self.ldae.latent_tokenizer.decode_images(copy, height, width), self.config.patch_size)

    def denoised_images(self, outputs: LDAEForPreTrainingOutput, height: int, width: int) -> torch.Tensor:
        """The predicted clean images, whatever the target (for pictures): pixels as predicted, latents decoded by
        the tokenizer, eps or v turned into z_0 first."""
        config, predicted = self.config, outputs.logits.float()
        if config.denoiser_output != "latent":
            return unpatchify(predicted, config.patch_size, height, width)
        clean = self.ldae.noise_scheduler.predicted_original(predicted, outputs.noisy_latents, outputs.timesteps)
        return self.ldae.latent_tokenizer.decode_images(clean, height, width)

    @capture_outputs
    def forward(
        self,
        pixel_values: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LDAEForPreTrainingOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): clean images in [-1, 1].
        timesteps (`torch.LongTensor` of shape `(batch_size,)`, *optional*): t in [0, T); sampled uniformly if None.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches, pca_dim)`, *optional*): the latent noise eps;
            sampled if None. Given both `timesteps` and `noise`, the forward pass is deterministic (in eval mode for a
            VAE tokenizer, which trains on posterior samples).
        """
        config = self.config
        backbone = self.ldae
        tokenizer = backbone.latent_tokenizer
        backbone.check_pixel_values(pixel_values, interpolate_pos_encoding)
        tokenizer.require_fitted("Pre-training")
        batch_size, device = pixel_values.shape[0], pixel_values.device
        if timesteps is None:
            timesteps = self.sample_timesteps(batch_size, device)
        timesteps = backbone.resolve_timesteps(timesteps, batch_size, device)

        height, width = pixel_values.shape[-2:]
        # The tokenizer is frozen: autograd records nothing here unless the images themselves need gradients.
        with torch.autocast(device_type=device.type, enabled=False):
            clean = pixel_values.float()
            clean_latents = tokenizer.encode_images(clean, sample=self.training)
            noisy_latents, noise = backbone.add_noise(clean_latents, timesteps, noise)
            noisy_pixel_values = None
            if config.denoiser_input == "pixels":
                noisy_pixel_values = tokenizer.decode_images(noisy_latents, height, width)
            targets = self.targets(clean, clean_latents, noise, timesteps)
        conditioning = backbone.conditioning(timesteps)
        inputs = noisy_latents if noisy_pixel_values is None else noisy_pixel_values
        hidden_states = backbone.embed(inputs, pixel_values)
        hidden_states = backbone.run_blocks(hidden_states, conditioning, backbone.blocks, **kwargs)
        logits = self.final_layer(hidden_states, conditioning)
        return LDAEForPreTrainingOutput(loss=self.loss(targets, logits, timesteps), logits=logits,
                                        noisy_pixel_values=noisy_pixel_values, timesteps=timesteps, targets=targets,
                                        noisy_latents=noisy_latents)


class LDAEForImageClassification(LDAEPreTrainedModel):
    """Average-pooled encoder features + a head: `linear_probe` (BatchNorm without affine + Linear, MAE's probe) or
    `fine_tune` (LayerNorm + Linear), per `config.classifier_head`."""

    def __init__(self, config: LDAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ldae = LDAEModel(config)
        if config.classifier_head == "linear_probe":
            self.fc_norm = nn.BatchNorm1d(config.hidden_size, affine=False, eps=1e-6)
        else:
            self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style layer groups (stem, blocks, head) for `timm.optim.param_groups_layer_decay`."""
        return {"stem": r"^ldae\.(?:pca|tokenizer|embeddings|time_embedder)", "blocks": [(r"^ldae\.blocks\.(\d+)", None)]}

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | int | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids; the loss uses
            `self.loss_function` (cross-entropy for single-label problems).
        """
        outputs = self.ldae(pixel_values, timesteps=timesteps, interpolate_pos_encoding=interpolate_pos_encoding,
                            **kwargs)
        logits = self.classifier(self.fc_norm(outputs.pooler_output))
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# ----------------------------------------------------------------------------------------------------------------
# The backbone for dense heads: encoder blocks as feature maps, optionally ViTDet's simple feature pyramid
# ----------------------------------------------------------------------------------------------------------------


class LDAELayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, height, width) map, as between ViTDet's deconvolutions."""

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return super().forward(feature_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def feature_pyramid_level(config: LDAEConfig, stride: int) -> nn.Module:
    """One level of ViTDet's simple feature pyramid from the stride-p map: 2x deconvolutions (LayerNorm + GELU
    between them) to go finer, max-pooling to go coarser, the map itself at stride p. Width stays `hidden_size`."""
    width, scale = config.hidden_size, config.patch_size / stride
    if scale < 1:
        return nn.MaxPool2d(kernel_size=stride // config.patch_size)
    layers = []
    for step in range(int(math.log2(scale))):
        if step:
            layers += [LDAELayerNorm2d(width, eps=config.layer_norm_eps), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class LDAEBackbone(BackboneMixin, LDAEPreTrainedModel):
    """The encoder for detection / segmentation heads (`AutoBackbone`): the outputs of the blocks named in
    `config.out_features` (`stem` = patch embeddings, `stageK` = block K), as (batch, hidden_size, H / p, W / p) maps
    at the feature time step, exactly `LDAEModel`'s hidden states; any image size divisible by the patch.
    With `config.feature_pyramid_strides`, the last selected map becomes one map per stride instead."""

    def __init__(self, config: LDAEConfig):
        if config.out_features is None:
            config = copy.deepcopy(config)  # the default selection, without changing the caller's config
            config.out_indices = [-1]
        super().__init__(config)
        self.num_features = [config.hidden_size] * len(self.stage_names)
        self.ldae = LDAEModel(config)
        self._keys_to_ignore_on_load_unexpected = self.ldae._keys_to_ignore_on_load_unexpected
        strides = config.feature_pyramid_strides
        self.feature_pyramid = None if strides is None else nn.ModuleList(
            feature_pyramid_level(config, stride) for stride in strides
        )
        self.post_init()

    @property
    def channels(self) -> list[int]:
        if self.feature_pyramid is None:
            return super().channels
        return [self.config.hidden_size] * len(self.feature_pyramid)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        timesteps: torch.Tensor | int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput | tuple:
        r"""
        timesteps (`int` or `torch.LongTensor` of shape `(batch_size,)`, *optional*): as in `LDAEModel`.

        Returns `feature_maps`, one (batch, hidden_size, height / p, width / p) map per selected stage (or per
        pyramid stride), `hidden_states` if asked for, `attentions` if asked for.
        """
        # The maps are hidden states: asked for here, not left to `filter_output_hidden_states` (which forces them
        # from transformers 5.12 on only); it drops them from the output unless the caller asked.
        kwargs["output_hidden_states"] = True
        outputs = self.ldae(pixel_values, timesteps=timesteps, interpolate_pos_encoding=True, **kwargs)
        grid = [size // self.config.patch_size for size in pixel_values.shape[-2:]]
        feature_maps = tuple(
            hidden_state.transpose(1, 2).reshape(hidden_state.shape[0], -1, *grid)
            for stage, hidden_state in zip(self.stage_names, outputs.hidden_states) if stage in self.out_features
        )
        if self.feature_pyramid is not None:
            feature_maps = tuple(level(feature_maps[-1]) for level in self.feature_pyramid)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


__all__ = [
    "make_image_processor",
    "LDAEBackbone",
    "LDAEForImageClassification",
    "LDAEForPreTraining",
    "LDAEForPreTrainingOutput",
    "LDAEModel",
    "LDAEPreTrainedModel",
    "patchify",
    "unpatchify",
]
