"""What every journey stage computes on fixed weights and inputs, as a fingerprint (for the noise-schedule refactor:
tests/fixtures/journey-reference.json holds the values the code before it computed)."""

import torch

from modeling_ldae import JOURNEY_STAGES, LDAEConfig, LDAEForPreTraining

REFERENCE_CONFIG = dict(image_size=16, patch_size=8, pca_dim=8, hidden_size=32, num_hidden_layers=1,
                        decoder_num_hidden_layers=1, num_attention_heads=2, conv_vae_block_out_channels=[8, 8, 8])
REFERENCE_TIMESTEPS = [0, 10, 500, 999]


def fingerprint(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().double()
    return {"sum": tensor.sum().item(), "norm": tensor.norm().item(), "first": tensor.flatten()[:6].tolist()}


def reference_model(stage: str) -> LDAEForPreTraining:
    """The stage on seeded, non-zero weights everywhere (a trained-looking tokenizer: orthonormal PCA, latent scale 1)."""
    torch.manual_seed(0)
    model = LDAEForPreTraining(LDAEConfig(**REFERENCE_CONFIG, **JOURNEY_STAGES[stage])).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        tokenizer = model.ldae.latent_tokenizer
        if model.config.tokenizer_type in ("pca", "identity"):
            basis, _ = torch.linalg.qr(torch.randn(192, 192, generator=generator, dtype=torch.float64))
            tokenizer.components.copy_(basis.T.float())
            tokenizer.eigenvalues.copy_(torch.linspace(2, 0.01, 192))
        else:
            tokenizer.latent_scale.fill_(1.0)
    return model


def stage_fingerprints(stage: str) -> dict:
    model = reference_model(stage)
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(4, 4, 8, generator=generator)
    timesteps = torch.tensor(REFERENCE_TIMESTEPS)
    with torch.no_grad():
        out = model(pixels, timesteps=timesteps, noise=noise)
        copy = model.copy_prediction(out, 16, 16)
        return {"loss": out.loss.item(), "targets": fingerprint(out.targets), "noisy_latents": fingerprint(out.noisy_latents),
                "copy_loss": model.loss(out.targets, copy, timesteps).item(), "copy_prediction": fingerprint(copy),
                "denoised_images": fingerprint(model.denoised_images(out, 16, 16)),
                "features": fingerprint(model.ldae(pixels).pooler_output)}


def all_fingerprints() -> dict:
    return {stage: stage_fingerprints(stage) for stage in JOURNEY_STAGES}
