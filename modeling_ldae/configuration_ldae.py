"""Configuration of l-DAE (latent Denoising Autoencoder) models."""

import math

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

FEATURE_INPUTS = ("clean", "pca", "noisy")
# The deconstructive journey (docs/journey.md): each stage is a choice of these four, l-DAE the defaults.
TOKENIZER_TYPES = ("pca", "identity", "patch_ae", "patch_vae", "conv_vae")
ORTHONORMAL_TOKENIZERS = ("pca", "identity")  # a full orthonormal basis: Eq. 4's residual and the PCA feature inputs
NOISE_SCHEDULES = ("linear_sigma", "linear_beta", "linear_gamma_squared")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("default", "uniform", "snr", "min_snr")
DENOISER_INPUTS = ("pixels", "latent")
DENOISER_OUTPUTS = ("pixels", "projected_pixels", "latent")
CLASSIFIER_HEADS = ("linear_probe", "fine_tune")
ADALN_INITS = ("zero", "xavier")

# Paper sizes (docs/method.md, "Network"): 256 px, patch 16, d = 32, decoder equal to the encoder.
PRESETS = {
    "ldae-vit-base": dict(hidden_size=768, num_hidden_layers=12, decoder_num_hidden_layers=12, num_attention_heads=12),
    "ldae-vit-half-large": dict(
        hidden_size=1024, num_hidden_layers=12, decoder_num_hidden_layers=12, num_attention_heads=16
    ),
    "ldae-vit-large": dict(hidden_size=1024, num_hidden_layers=24, decoder_num_hidden_layers=24, num_attention_heads=16),
    # CPU-sized, for tests and examples on 32 px CIFAR images: 8 x 8 patches keep D = 192 large
    # relative to d, the regime where latent noise differs from pixel noise.
    "ldae-tiny": dict(
        image_size=32,
        patch_size=8,
        pca_dim=8,  # d / D = 4%, the paper's ratio (32 / 768)
        hidden_size=64,
        num_hidden_layers=2,
        decoder_num_hidden_layers=2,
        num_attention_heads=4,
    ),
}

# Every stage of the journey from DiT to l-DAE (talk labels; docs/journey.md), as config values on top of a
# size preset. Stage 3 is the tokenizer table, run at several `pca_dim`; "3-conv-vae" is stage 2d itself.
_LATENT_EPSILON = dict(noise_schedule="linear_gamma_squared", prediction_type="epsilon", denoiser_input="latent",
                       denoiser_output="latent")
JOURNEY_STAGES = {
    "2c": dict(_LATENT_EPSILON, tokenizer_type="conv_vae", noise_schedule="linear_beta"),
    "2d": dict(_LATENT_EPSILON, tokenizer_type="conv_vae"),
    "3-conv-vae": dict(_LATENT_EPSILON, tokenizer_type="conv_vae"),
    "3-patch-vae": dict(_LATENT_EPSILON, tokenizer_type="patch_vae"),
    "3-patch-ae": dict(_LATENT_EPSILON, tokenizer_type="patch_ae"),
    "3-patch-pca": dict(_LATENT_EPSILON, tokenizer_type="pca"),
    "4a": dict(_LATENT_EPSILON, tokenizer_type="pca", prediction_type="sample"),
    "4b": dict(tokenizer_type="pca", noise_schedule="linear_sigma", prediction_type="sample", denoiser_input="latent",
               denoiser_output="latent"),
    "4c": dict(tokenizer_type="pca", noise_schedule="linear_sigma", prediction_type="sample", denoiser_input="pixels",
               denoiser_output="latent"),
    "4d": dict(tokenizer_type="pca", noise_schedule="linear_sigma", prediction_type="sample", denoiser_input="pixels",
               denoiser_output="projected_pixels"),
    "4e": dict(tokenizer_type="pca", noise_schedule="linear_sigma", prediction_type="sample", denoiser_input="pixels",
               denoiser_output="pixels"),  # l-DAE: the defaults
}


class LDAEConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of an l-DAE model: a DiT-style ViT encoder-decoder (adaLN-Zero time conditioning, no class token)
    that denoises images whose noise was added in a patch-wise PCA latent. Defaults are the paper's ViT-B.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): width of the blocks.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            encoder depth. The encoder is the first `num_hidden_layers` blocks of one stack, so loading a
            pre-training checkpoint with another value re-splits it (the paper's encoder-depth ablation).
        decoder_num_hidden_layers (`int`, *optional*, defaults to 12): decoder depth (same width, no bottleneck).
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads per block.
        intermediate_size (`int`, *optional*): MLP width; defaults to 4 x `hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`): MLP activation (DiT's tanh GELU).
        image_size (`int`, *optional*, defaults to 256): input resolution.
        patch_size (`int`, *optional*, defaults to 16): patch side p; a patch has D = p * p * num_channels values.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        qkv_bias (`bool`, *optional*, defaults to `True`): bias on the query/key/value projection.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the time-embedder initialisation.
        adaln_init (`str`, *optional*, defaults to `"zero"`):
            `"zero"`: DiT's adaLN-Zero (zero modulations and final layer, normal(`initializer_range`) time MLP);
            `"xavier"`: those layers xavier-uniform like every other Linear, the init that ldae <= 0.1 actually applied
            (a `transformers` 5 custom-code skip), to reproduce runs made with it. Only construction reads it.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): attention dropout.
        drop_path_rate (`float`, *optional*, defaults to 0.0): stochastic depth, linearly increasing over blocks.
        pca_dim (`int`, *optional*, defaults to 32): latent dimension d per token, for every tokenizer (1 <= d <= D).
        tokenizer_type (`str`, *optional*, defaults to `"pca"`):
            what maps images to d-dim latent tokens and back, fitted or trained before denoising, then frozen:
            `"pca"` (the patch-wise PCA, l-DAE), `"identity"` (the pixels, d = D), `"patch_ae"` / `"patch_vae"`
            (linear patch-wise autoencoder / VAE, U and V of d x D), `"conv_vae"` (diffusers' `AutoencoderKL`,
            stride `patch_size / 2`, d / 4 channels, 2 x 2 latent patches per token; needs `diffusers`).
        conv_vae_block_out_channels (`list[int]`, *optional*):
            widths of the conv VAE's log2(patch_size) blocks; defaults to 32, 64, 128, 128, ...
        noise_schedule (`str`, *optional*, defaults to `"linear_sigma"`):
            `"linear_sigma"`: no signal scaling, z_t = z_0 + sigma_t eps, sigma_t = sigma_max * t / (T - 1) (l-DAE);
            variance-preserving z_t = gamma_t z_0 + sigma_t eps with gamma_t^2 + sigma_t^2 = 1:
            `"linear_beta"` (DDPM: gamma_t^2 = prod_{s <= t} (1 - beta_s), beta linear from `beta_start` to
            `beta_end`) or `"linear_gamma_squared"` (gamma_t^2 = 1 - (t + 1) / T).
        beta_start (`float`, *optional*, defaults to 1e-4), beta_end (`float`, *optional*, defaults to 0.02):
            DDPM's betas, for `noise_schedule="linear_beta"`.
        num_timesteps (`int`, *optional*, defaults to 1000): T.
        sigma_max (`float`, *optional*, defaults to sqrt(2)): largest noise level of `"linear_sigma"`.
        sigma_min (`float`, *optional*, defaults to 0.0):
            smallest noise level of `"linear_sigma"`: sigma_t = sigma_min + (sigma_max - sigma_min) t / (T - 1). l-DAE
            starts at 0; epsilon prediction and the `"snr"` weighting of a clean-sample target need it above 0
            (about 0.032, stage 3's smallest sigma / gamma, is a reasonable value).
        prediction_type (`str`, *optional*, defaults to `"sample"`):
            as in `diffusers`: `"sample"` (the clean signal), `"epsilon"` (the noise) or `"v_prediction"`
            (v = gamma_t eps - sigma_t z_0; variance-preserving schedules only).
        loss_weighting (`str`, *optional*, defaults to `"default"`):
            lambda_t, the factor on each example's squared error (on the whole Eq. 4 error for an image target);
            SNR_t = gamma_t^2 / sigma_t^2 of the schedule. `"default"`: SNR / (1 + SNR) for the clean sample
            (1 / (1 + sigma^2) for l-DAE, gamma^2 variance-preserving), 1 for epsilon and v; `"uniform"`: 1;
            `"snr"`: the weight that makes the loss the epsilon loss (sample SNR, v SNR / (1 + SNR), epsilon 1);
            `"min_snr"`: Min-SNR (Hang et al. 2023) with `snr_gamma` (sample min(SNR, g), epsilon min(1, g / SNR),
            v min(SNR, g) / (1 + SNR)). See `scheduling_ldae.LDAENoiseScheduler`.
        snr_gamma (`float`, *optional*, defaults to 5.0): g of `"min_snr"`.
        denoiser_input (`str`, *optional*, defaults to `"pixels"`):
            `"pixels"`: the noisy latent brought back to an image by the inverse tokenizer, embedded by the patch
            projection (l-DAE); `"latent"`: the latent tokens, embedded by a d-wide linear projection.
        denoiser_output (`str`, *optional*, defaults to `"pixels"`):
            `"pixels"`: the original image, Eq. 4 with `residual_loss_weight` (l-DAE; orthonormal tokenizers only);
            `"projected_pixels"`: the tokenizer's reconstruction of the clean image (mu + V^T V (x - mu) for the
            PCA), plain squared error; `"latent"`: the clean latent tokens (or eps) in d dimensions.
        single_noise_level (`float`, *optional*):
            if set, every training example uses this sigma instead of the multi-level schedule (paper ablation;
            the paper's "1/3" likely lost a square root, hence the default sqrt(1/3) of
            `LDAEConfig.SINGLE_NOISE_LEVEL`). `None` means multi-level noise.
        residual_loss_weight (`float`, *optional*, defaults to 0.1): loss weight of the D - d PCA residual components.
        time_embed_dim (`int`, *optional*): width of the time-conditioning vector; defaults to `hidden_size // 4`.
        frequency_embedding_size (`int`, *optional*, defaults to 256): sinusoidal time-embedding width (DiT).
        feature_timestep (`int`, *optional*, defaults to 10): t used for features when none is given.
        feature_input (`str`, *optional*, defaults to `"clean"`):
            what `LDAEModel` sees: `"clean"` (the raw image), `"pca"` (its projection mu + V^T V (x - mu)) or
            `"noisy"` (latent noise at `feature_timestep` added, as in pre-training).
        classifier_head (`str`, *optional*, defaults to `"fine_tune"`):
            head of `LDAEForImageClassification`: `"linear_probe"` (BatchNorm without affine + Linear, MAE's probe)
            or `"fine_tune"` (LayerNorm + Linear).
        time_conditioning_merged (`bool`, *optional*, defaults to `False`):
            set by `merge_time_conditioning()`: the blocks are a plain pre-norm ViT with the constants of
            `merged_timestep` folded in.
        merged_timestep (`int`, *optional*): the t the merged constants were computed at.
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*):
            which maps `LDAEBackbone` returns, by name in `stage_names` (`"stem"` = the patch embeddings, `"stageK"` =
            the output of encoder block K) or by index; either sets the other. Unset, the backbone returns the last
            block. They select outputs only: no other model reads them.
        feature_pyramid_strides (`list[int]`, *optional*):
            if set, `LDAEBackbone` turns the last selected map into ViTDet's simple feature pyramid, one map per
            stride (each `patch_size` times a power of two, e.g. `[4, 8, 16, 32]` for p = 16): deconvolutions up,
            max-pooling down. New parameters of the backbone only.
    """

    model_type = "ldae"
    SINGLE_NOISE_LEVEL = math.sqrt(1 / 3)

    def __init__(
        self,
        hidden_size=768,
        num_hidden_layers=12,
        decoder_num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=None,
        hidden_act="gelu_pytorch_tanh",
        image_size=256,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
        adaln_init="zero",
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        pca_dim=32,
        tokenizer_type="pca",
        conv_vae_block_out_channels=None,
        noise_schedule="linear_sigma",
        beta_start=1e-4,
        beta_end=0.02,
        num_timesteps=1000,
        sigma_max=math.sqrt(2),
        sigma_min=0.0,
        prediction_type="sample",
        loss_weighting="default",
        snr_gamma=5.0,
        denoiser_input="pixels",
        denoiser_output="pixels",
        single_noise_level=None,
        residual_loss_weight=0.1,
        time_embed_dim=None,
        frequency_embedding_size=256,
        feature_timestep=10,
        feature_input="clean",
        classifier_head="fine_tune",
        time_conditioning_merged=False,
        merged_timestep=None,
        out_features=None,
        out_indices=None,
        feature_pyramid_strides=None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.hidden_act = hidden_act
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.adaln_init = adaln_init
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.pca_dim = pca_dim
        self.tokenizer_type = tokenizer_type
        self.conv_vae_block_out_channels = conv_vae_block_out_channels
        self.noise_schedule = noise_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.num_timesteps = num_timesteps
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = snr_gamma
        self.denoiser_input = denoiser_input
        self.denoiser_output = denoiser_output
        self.single_noise_level = single_noise_level
        self.residual_loss_weight = residual_loss_weight
        self.time_embed_dim = time_embed_dim if time_embed_dim is not None else hidden_size // 4
        self.frequency_embedding_size = frequency_embedding_size
        self.feature_timestep = feature_timestep
        self.feature_input = feature_input
        self.classifier_head = classifier_head
        self.time_conditioning_merged = time_conditioning_merged
        self.merged_timestep = merged_timestep
        self.feature_pyramid_strides = feature_pyramid_strides
        kwargs.pop("stage_names", None)  # derived from the encoder depth (see the property), never stored
        # No default selection stored (the backbone picks the last stage): a stored "last stage" of a 12-block
        # encoder would make the same checkpoint invalid when re-split at 6 blocks.
        self._out_features, self._out_indices = None, None
        if out_features is not None or out_indices is not None:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__init__(**kwargs)
        self.validate_ldae()

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages, "stem" and one per encoder block: computed, so that a checkpoint loaded with another
        `num_hidden_layers` (the re-split) gets the stages of its own depth."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    @property
    def patch_dim(self) -> int:
        """D: values per patch."""
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def variance_preserving(self) -> bool:
        return self.noise_schedule != "linear_sigma"

    @property
    def output_dim(self) -> int:
        """Values the denoiser predicts per token: a patch's pixels, or its d latent values."""
        return self.pca_dim if self.denoiser_output == "latent" else self.patch_dim

    @property
    def conv_vae_widths(self) -> list[int]:
        """The conv VAE's block widths: log2(patch_size) blocks, so that its stride is patch_size / 2."""
        num_blocks = int(math.log2(self.patch_size))
        return list(self.conv_vae_block_out_channels or [32 * 2 ** min(i, 2) for i in range(num_blocks)])

    def validate_ldae(self):
        """Raise a `ValueError` naming the field, the value and what is expected."""

        def expect(ok, name, value, expected):
            if not ok:
                raise ValueError(f"LDAEConfig: `{name}` = {value!r}, expected {expected}.")

        expect(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
               f"a multiple of num_attention_heads ({self.num_attention_heads})")
        expect(self.image_size % self.patch_size == 0, "image_size", self.image_size,
               f"a multiple of patch_size ({self.patch_size})")
        expect(1 <= self.pca_dim <= self.patch_dim, "pca_dim", self.pca_dim,
               f"an integer in 1..{self.patch_dim} (D = patch_size^2 * num_channels)")
        expect(self.num_hidden_layers >= 1, "num_hidden_layers", self.num_hidden_layers, "at least 1")
        expect(self.decoder_num_hidden_layers >= 0, "decoder_num_hidden_layers", self.decoder_num_hidden_layers,
               "at least 0")
        expect(self.num_timesteps >= 2, "num_timesteps", self.num_timesteps, "at least 2")
        expect(0 <= self.feature_timestep < self.num_timesteps, "feature_timestep", self.feature_timestep,
               f"an integer in [0, {self.num_timesteps})")
        expect(self.feature_input in FEATURE_INPUTS, "feature_input", self.feature_input, f"one of {FEATURE_INPUTS}")
        expect(self.adaln_init in ADALN_INITS, "adaln_init", self.adaln_init, f"one of {ADALN_INITS}")
        expect(self.classifier_head in CLASSIFIER_HEADS, "classifier_head", self.classifier_head,
               f"one of {CLASSIFIER_HEADS}")
        expect(self.single_noise_level is None or self.single_noise_level >= 0, "single_noise_level",
               self.single_noise_level, "None (multi-level noise) or a sigma >= 0")
        self.validate_journey(expect)
        strides = self.feature_pyramid_strides
        expect(strides is None or (len(strides) > 0 and all(
            isinstance(s, int) and s > 0 and math.log2(s / self.patch_size).is_integer() for s in strides)),
            "feature_pyramid_strides", strides, f"None or a list of patch_size ({self.patch_size}) times powers of 2")
        expect(strides is None or self._out_features is None or len(self._out_features) == 1, "out_features",
               self._out_features, "one stage when feature_pyramid_strides is set (the pyramid is built from one map)")

    def validate_journey(self, expect):
        """The tokenizer, schedule, input and target: each a valid choice, and together a combination that means
        something (each error names the valid choices)."""
        for name, choices in (("tokenizer_type", TOKENIZER_TYPES), ("noise_schedule", NOISE_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES), ("loss_weighting", LOSS_WEIGHTINGS),
                              ("denoiser_input", DENOISER_INPUTS),
                              ("denoiser_output", DENOISER_OUTPUTS)):
            expect(getattr(self, name) in choices, name, getattr(self, name), f"one of {choices}")
        tokenizer, orthonormal = self.tokenizer_type, self.tokenizer_type in ORTHONORMAL_TOKENIZERS
        expect(tokenizer != "identity" or self.pca_dim == self.patch_dim, "pca_dim", self.pca_dim,
               f"D = {self.patch_dim} with tokenizer_type='identity' (the pixels are the latent)")
        if tokenizer == "conv_vae":
            expect(self.pca_dim % 4 == 0, "pca_dim", self.pca_dim,
                   "a multiple of 4 with tokenizer_type='conv_vae' (a token is 2 x 2 latent pixels of d / 4 channels)")
            expect(self.patch_size >= 2 and math.log2(self.patch_size).is_integer(), "patch_size", self.patch_size,
                   "a power of 2 with tokenizer_type='conv_vae' (its stride is patch_size / 2)")
            expect(len(self.conv_vae_widths) == int(math.log2(self.patch_size)), "conv_vae_block_out_channels",
                   self.conv_vae_block_out_channels, f"{int(math.log2(self.patch_size))} widths (log2 of patch_size)")
        expect(self.denoiser_output != "pixels" or orthonormal, "denoiser_output", self.denoiser_output,
               f"'projected_pixels' or 'latent' with tokenizer_type={tokenizer!r}: the original-image target "
               f"(Eq. 4) needs a full orthonormal basis, i.e. tokenizer_type in {ORTHONORMAL_TOKENIZERS}")
        noise_target = self.prediction_type in ("epsilon", "v_prediction")
        expect(not noise_target or self.denoiser_output == "latent", "denoiser_output", self.denoiser_output,
               f"'latent' with prediction_type={self.prediction_type!r} (the noise lives in the latent)")
        expect(self.prediction_type != "v_prediction" or self.variance_preserving, "noise_schedule",
               self.noise_schedule, "'linear_beta' or 'linear_gamma_squared' with prediction_type='v_prediction' "
               "(v is defined for variance-preserving schedules)")
        expect(self.snr_gamma > 0, "snr_gamma", self.snr_gamma, "a number > 0")
        if not self.variance_preserving:
            expect(0 <= self.sigma_min < self.sigma_max, "sigma_min", self.sigma_min,
                   f"a number in [0, sigma_max = {self.sigma_max})")
            # At sigma_0 = 0 the noise cannot be predicted, and SNR_0 is infinite.
            expect(self.prediction_type != "epsilon" or self.sigma_min > 0, "sigma_min", self.sigma_min,
                   "> 0 with prediction_type='epsilon' and noise_schedule='linear_sigma' (e.g. 0.032), or a "
                   "variance-preserving noise_schedule ('linear_beta', 'linear_gamma_squared')")
            expect(not (self.loss_weighting == "snr" and self.prediction_type == "sample") or self.sigma_min > 0,
                   "sigma_min", self.sigma_min, "> 0 with loss_weighting='snr' and noise_schedule='linear_sigma' "
                   "(SNR = 1 / sigma^2 is infinite at sigma = 0; e.g. 0.032), or another loss_weighting")
        if self.variance_preserving:
            expect(self.single_noise_level is None, "single_noise_level", self.single_noise_level,
                   f"None with noise_schedule={self.noise_schedule!r} (a single sigma is an ablation of the unscaled "
                   "'linear_sigma' schedule)")
            expect(math.isclose(self.sigma_max, math.sqrt(2)), "sigma_max", self.sigma_max,
                   f"its default sqrt(2) with noise_schedule={self.noise_schedule!r} (a variance-preserving schedule "
                   "ends at sigma = 1; sigma_max shapes 'linear_sigma' only)")
            expect(self.sigma_min == 0, "sigma_min", self.sigma_min,
                   f"its default 0 with noise_schedule={self.noise_schedule!r} (sigma_min shapes 'linear_sigma' only)")
        expect(0 < self.beta_start < self.beta_end < 1, "beta_start", (self.beta_start, self.beta_end),
               "0 < beta_start < beta_end < 1")
        expect(self.feature_input == "clean" or orthonormal, "feature_input", self.feature_input,
               f"'clean' with tokenizer_type={tokenizer!r}: 'pca' and 'noisy' are PCA-latent ablations, defined for "
               f"tokenizer_type in {ORTHONORMAL_TOKENIZERS}")

    @classmethod
    def from_preset(cls, name: str, journey_stage: str | None = None, **overrides) -> "LDAEConfig":
        """One of `PRESETS` (`ldae-vit-base`, `ldae-vit-half-large`, `ldae-vit-large`, `ldae-tiny`), optionally at a
        stage of the deconstructive journey (`JOURNEY_STAGES`: "2c", "2d", "3-patch-ae", ..., "4e"), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown l-DAE preset {name!r}: expected one of {sorted(PRESETS)}.")
        if journey_stage is not None and journey_stage not in JOURNEY_STAGES:
            raise ValueError(f"Unknown journey stage {journey_stage!r}: expected one of {list(JOURNEY_STAGES)}.")
        return cls(**{**PRESETS[name], **JOURNEY_STAGES.get(journey_stage, {}), **overrides})
