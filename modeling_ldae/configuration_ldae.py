"""Configuration of l-DAE (latent Denoising Autoencoder) models."""

import math

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

FEATURE_INPUTS = ("clean", "pca", "noisy")
CLASSIFIER_HEADS = ("linear_probe", "fine_tune")

# Paper sizes (Sec. 4 of ldae-method.md): 256 px, patch 16, d = 32, decoder equal to the encoder.
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
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): attention dropout.
        drop_path_rate (`float`, *optional*, defaults to 0.0): stochastic depth, linearly increasing over blocks.
        pca_dim (`int`, *optional*, defaults to 32): latent dimension d of the PCA tokenizer (1 <= d <= D).
        num_timesteps (`int`, *optional*, defaults to 1000): T; sigma_t = sigma_max * t / (T - 1).
        sigma_max (`float`, *optional*, defaults to sqrt(2)): largest noise level.
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
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        pca_dim=32,
        num_timesteps=1000,
        sigma_max=math.sqrt(2),
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
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.pca_dim = pca_dim
        self.num_timesteps = num_timesteps
        self.sigma_max = sigma_max
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
        expect(self.classifier_head in CLASSIFIER_HEADS, "classifier_head", self.classifier_head,
               f"one of {CLASSIFIER_HEADS}")
        expect(self.single_noise_level is None or self.single_noise_level >= 0, "single_noise_level",
               self.single_noise_level, "None (multi-level noise) or a sigma >= 0")
        strides = self.feature_pyramid_strides
        expect(strides is None or (len(strides) > 0 and all(
            isinstance(s, int) and s > 0 and math.log2(s / self.patch_size).is_integer() for s in strides)),
            "feature_pyramid_strides", strides, f"None or a list of patch_size ({self.patch_size}) times powers of 2")
        expect(strides is None or self._out_features is None or len(self._out_features) == 1, "out_features",
               self._out_features, "one stage when feature_pyramid_strides is set (the pyramid is built from one map)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LDAEConfig":
        """One of `PRESETS` (`ldae-vit-base`, `ldae-vit-half-large`, `ldae-vit-large`, `ldae-tiny`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown l-DAE preset {name!r}: expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})
