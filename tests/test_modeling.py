"""The l-DAE model package: config, PCA tokenizer, formulas, forward passes, save/load, Auto/remote code, conventions."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from modeling_ldae import (
    LDAEBackbone,
    LDAEConfig,
    LDAEForImageClassification,
    LDAEForPreTraining,
    LDAEModel,
    PatchPCAAccumulator,
    fit_patch_pca,
    patchify,
    unpatchify,
)
from modeling_ldae.configuration_ldae import PRESETS

TINY = dict(image_size=32, patch_size=8, pca_dim=8, hidden_size=32, num_hidden_layers=2,
            decoder_num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def images(cifar10_train_images):
    return cifar10_train_images[0][:8]


@pytest.fixture(scope="module")
def pca(cifar10_train_images):
    return fit_patch_pca(cifar10_train_images[0].split(128), patch_size=8)


def tiny_config(**overrides):
    return LDAEConfig(**{**TINY, **overrides})


def pretraining_model(pca, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LDAEForPreTraining(tiny_config(**overrides))
    model.set_pca(*pca)
    # adaLN-Zero makes every block an identity at init; randomise so the tests exercise real computation.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                parameter.normal_(std=0.05)
    return model.eval()


# -- config ------------------------------------------------------------------------------------------------------


def test_config_defaults_round_trip_and_presets(tmp_path):
    config = LDAEConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.pca_dim, config.num_timesteps) == (768, 12, 32, 1000)
    assert config.time_embed_dim == 192 and math.isclose(config.sigma_max, math.sqrt(2))
    assert config.residual_loss_weight == 0.1 and config.feature_timestep == 10 and config.feature_input == "clean"
    assert LDAEConfig.from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()
    custom = LDAEConfig(pca_dim=16, single_noise_level=0.5, feature_input="noisy", num_labels=7)
    custom.save_pretrained(tmp_path)
    assert LDAEConfig.from_pretrained(tmp_path).to_dict() == custom.to_dict()
    sizes = {name: (c.num_hidden_layers, c.decoder_num_hidden_layers, c.hidden_size)
             for name, c in ((n, LDAEConfig.from_preset(n)) for n in PRESETS)}
    assert sizes["ldae-vit-base"] == (12, 12, 768) and sizes["ldae-vit-half-large"] == (12, 12, 1024)
    assert sizes["ldae-vit-large"] == (24, 24, 1024) and LDAEConfig.from_preset("ldae-tiny").image_size == 32
    assert LDAEConfig.from_preset("ldae-vit-base", pca_dim=16).pca_dim == 16


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(pca_dim=0), "pca_dim"), (dict(pca_dim=769), "pca_dim"), (dict(image_size=250), "image_size"),
     (dict(feature_input="noise"), "feature_input"), (dict(hidden_size=100), "hidden_size"),
     (dict(feature_timestep=1000), "feature_timestep"), (dict(classifier_head="mlp"), "classifier_head")],
)
def test_config_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LDAEConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown l-DAE preset 'ldae-huge'.*ldae-tiny"):
        LDAEConfig.from_preset("ldae-huge")


# -- initialisation ------------------------------------------------------------------------------------------------


def assert_documented_init(model, head_std=None):
    """DiT's adaLN-Zero (zero modulations and final layer), its normal(0.02) time MLP, and MAE's classifier head:
    checked on the values, whatever class `model` is."""
    base = model.base_model
    for block in base.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    for linear in (base.time_embedder.mlp[0], base.time_embedder.mlp[2]):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.15) and not linear.bias.any()
    if isinstance(model, LDAEForPreTraining):
        final = model.final_layer
        assert not any(p.any() for p in (final.linear.weight, final.linear.bias, *final.adaLN_modulation.parameters()))
    if head_std is not None:
        assert model.classifier.weight.std().item() == pytest.approx(head_std, rel=0.15)
        assert model.classifier.weight.abs().max().item() < 5 * head_std and not model.classifier.bias.any()


HEAD_STD = {"linear_probe": 0.01, "fine_tune": 2e-5}  # MAE's probe and fine-tuning heads


@pytest.mark.parametrize("cls", [LDAEModel, LDAEForPreTraining, LDAEForImageClassification, LDAEBackbone])
def test_every_construction_path_applies_the_documented_init(cls):
    from transformers import AutoBackbone, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    auto = {LDAEModel: AutoModel, LDAEForPreTraining: AutoModelForPreTraining, LDAEBackbone: AutoBackbone,
            LDAEForImageClassification: AutoModelForImageClassification}[cls]
    for head in HEAD_STD:
        config = tiny_config(hidden_size=64, classifier_head=head, num_labels=10)
        for model in (cls(config), auto.from_config(config)):
            assert type(model) is cls
            assert_documented_init(model, HEAD_STD[head] if cls is LDAEForImageClassification else None)


@pytest.mark.parametrize("head", list(HEAD_STD))
def test_a_classifier_made_from_a_pretraining_checkpoint_gets_the_documented_head(head, saved_pretraining):
    model, path = saved_pretraining
    from transformers import AutoModelForImageClassification

    for classifier in (LDAEForImageClassification.from_pretrained(path, classifier_head=head, num_labels=10),
                       AutoModelForImageClassification.from_pretrained(path, classifier_head=head, num_labels=10)):
        assert classifier.classifier.weight.std().item() == pytest.approx(HEAD_STD[head], rel=0.15)
        assert not classifier.classifier.bias.any()
        # the loaded backbone is the checkpoint's, untouched by the init
        for name, value in classifier.ldae.state_dict().items():
            torch.testing.assert_close(value, model.ldae.state_dict()[name], rtol=0, atol=0, msg=name)


def test_xavier_adaln_init_reproduces_the_init_of_ldae_0_1():
    zero, xavier = (LDAEForPreTraining(tiny_config(hidden_size=64, adaln_init=init)) for init in ("zero", "xavier"))
    modulation = xavier.ldae.blocks[0].adaLN_modulation[-1].weight
    bound = math.sqrt(6 / sum(modulation.shape))
    assert modulation.abs().max().item() == pytest.approx(bound, rel=0.05) and modulation.abs().max() <= bound
    assert xavier.final_layer.linear.weight.abs().max().item() > 0.05
    assert xavier.ldae.time_embedder.mlp[0].weight.std().item() > 0.05
    assert not zero.ldae.blocks[0].adaLN_modulation[-1].weight.any()


# -- PCA tokenizer -------------------------------------------------------------------------------------------------


def test_pca_fit_equals_float64_eigh_reference(cifar10_train_images):
    images = cifar10_train_images[0][:256]
    mean, components, eigenvalues = fit_patch_pca(images.split(64), patch_size=8)
    patches = patchify(images.double(), 8).reshape(-1, 192).numpy()
    reference_values, reference_vectors = np.linalg.eigh(np.cov(patches, rowvar=False, bias=True))
    reference_values, reference_vectors = reference_values[::-1], reference_vectors[:, ::-1]
    np.testing.assert_allclose(mean.numpy(), patches.mean(0), atol=1e-12)
    np.testing.assert_allclose(eigenvalues.numpy(), np.clip(reference_values, 0, None), rtol=1e-8, atol=1e-12)
    for d in (8, 32):  # the projector V^T V is sign-free; compare where the spectrum has a gap
        projector = components[:d].numpy().T @ components[:d].numpy()
        np.testing.assert_allclose(projector, reference_vectors[:, :d] @ reference_vectors[:, :d].T, atol=1e-7)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    assert torch.all(largest > 0), "sign convention: largest-magnitude entry positive"
    torch.testing.assert_close(components @ components.T, torch.eye(192, dtype=torch.float64), atol=1e-10, rtol=0)


def test_pca_accumulators_sum_across_processes_and_subsample(cifar10_train_images):
    images = cifar10_train_images[0][:128]
    whole = fit_patch_pca([images], patch_size=8)
    # Two "processes", each with half of the images, summed: the same exact result.
    first, second = PatchPCAAccumulator(8), PatchPCAAccumulator(8)
    first.update(images[:64])
    second.update(images[64:])
    others = iter((second.count, second.sum, second.outer))
    first.reduce(lambda tensor: tensor + next(others))
    mean, components, eigenvalues = first.finalize()
    torch.testing.assert_close(mean, whole[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(eigenvalues, whole[2], atol=1e-12, rtol=0)
    # Eigenvectors of near-equal small eigenvalues may rotate within their subspace: compare the covariance they give.
    torch.testing.assert_close(components.T @ torch.diag(eigenvalues) @ components,
                               whole[1].T @ torch.diag(whole[2]) @ whole[1], atol=1e-12, rtol=0)
    sampled = PatchPCAAccumulator(8)
    sampled.update(images, num_patches_per_image=3, generator=torch.Generator().manual_seed(0))
    assert int(sampled.count) == 128 * 3


def test_pca_reads_the_channel_count_from_the_data(cifar10_train_images):
    gray = cifar10_train_images[0][:64].mean(1, keepdim=True)  # a 1-channel data set
    mean, components, eigenvalues = fit_patch_pca(gray.split(32), patch_size=8)
    assert mean.shape == (64,) and components.shape == (64, 64)
    torch.testing.assert_close(eigenvalues, fit_patch_pca([gray], patch_size=8, num_channels=1)[2])
    with pytest.raises(ValueError, match="batch has 3 channels, expected 1"):
        fit_patch_pca([gray, cifar10_train_images[0][:4]], patch_size=8)
    with pytest.raises(ValueError, match="batch has 1 channels, expected 3"):
        fit_patch_pca([gray], patch_size=8, num_channels=3)
    model = LDAEModel(tiny_config(num_channels=1))
    model.set_pca(mean, components, eigenvalues)
    assert model(gray[:2]).last_hidden_state.shape == (2, 16, 32)


def test_set_pca_validates(pca):
    model = LDAEModel(tiny_config())
    mean, components, eigenvalues = pca
    with pytest.raises(ValueError, match="`components` has shape"):
        model.set_pca(mean, components[:10], eigenvalues)
    with pytest.raises(ValueError, match="not orthonormal"):
        model.set_pca(mean, components * 2, eigenvalues)
    with pytest.raises(ValueError, match="descending"):
        model.set_pca(mean, components, eigenvalues.flip(0))
    model.set_pca(mean, components, eigenvalues)
    model.set_pca(mean, components, eigenvalues)  # may be called again
    assert model.pca.is_fitted and model.pca.components.dtype == torch.float32
    assert not any("pca" in name for name, _ in model.named_parameters()), "the PCA is never trainable"


def test_unfitted_pca_refuses_pretraining_and_pca_feature_modes(images):
    with pytest.raises(ValueError, match="Pre-training needs a fitted PCA tokenizer.*set_pca"):
        LDAEForPreTraining(tiny_config())(images)
    for mode in ("pca", "noisy"):
        with pytest.raises(ValueError, match=f"feature_input='{mode}' needs a fitted PCA"):
            LDAEModel(tiny_config(feature_input=mode))(images)
    # Plain features and classification run without one (random-init baselines, supervised from scratch).
    assert LDAEModel(tiny_config())(images).pooler_output.shape == (8, 32)
    assert LDAEForImageClassification(tiny_config(num_labels=3))(images).logits.shape == (8, 3)


# -- formulas ------------------------------------------------------------------------------------------------------


def test_noisy_input_and_loss_equal_the_paper_formulas(images, pca):
    model = pretraining_model(pca)
    timesteps = torch.tensor([0, 10, 100, 250, 500, 750, 900, 999])
    noise = torch.randn(8, 16, 8)
    output = model(images, timesteps=timesteps, noise=noise)

    mean, components = pca[0].float(), pca[1].float()
    top = components[:8]
    x0 = patchify(images, 8)
    sigma = math.sqrt(2) * timesteps.float() / 999
    expected_input = mean + ((x0 - mean) @ top.T + sigma[:, None, None] * noise) @ top
    torch.testing.assert_close(patchify(output.noisy_pixel_values, 8), expected_input, atol=1e-5, rtol=1e-5)

    error = x0 - output.logits
    r = error @ components.T  # all D components, weights 1 for the top d and 0.1 for the rest
    weights = torch.cat([torch.ones(8), torch.full((184,), 0.1)])
    per_patch = (weights * r.square()).sum(-1) / (1 + sigma[:, None] ** 2)
    torch.testing.assert_close(output.loss, per_patch.mean(), atol=1e-5, rtol=1e-5)
    assert output.logits.shape == (8, 16, 192) and torch.equal(output.timesteps, timesteps)


def test_pretraining_is_deterministic_given_t_and_noise_and_samples_otherwise(images, pca):
    model = pretraining_model(pca)
    timesteps, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 16, 8)
    a, b = model(images, timesteps=timesteps, noise=noise), model(images, timesteps=timesteps, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    c, d = model(images), model(images)
    assert not torch.equal(c.timesteps, d.timesteps) and c.timesteps.min() >= 0 and c.timesteps.max() < 1000


def test_single_noise_level(images, pca):
    model = pretraining_model(pca, single_noise_level=LDAEConfig.SINGLE_NOISE_LEVEL)
    timesteps = model(images).timesteps
    assert torch.all(timesteps == timesteps[0])
    assert math.isclose(math.sqrt(2) * timesteps[0].item() / 999, math.sqrt(1 / 3), rel_tol=2e-3)


@pytest.mark.floor
def test_bf16_keeps_the_pca_exact(images, pca, tmp_path):
    model = pretraining_model(pca)
    reference = model.ldae.pca.components.clone()
    model.to(torch.bfloat16)
    assert model.ldae.pca.components.dtype == torch.float32 and torch.equal(model.ldae.pca.components, reference)
    timesteps, noise = torch.full((8,), 10), torch.randn(8, 16, 8)
    output = model(images, timesteps=timesteps, noise=noise)  # a bf16 model fed the loader's fp32 pixels
    # sigma_10 = 0.014 survives: noise and PCA run in fp32, not on bf16-rounded pixels.
    fp32_input, _ = model.ldae.add_latent_noise(images, timesteps, noise)
    torch.testing.assert_close(patchify(output.noisy_pixel_values, 8), fp32_input)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    pretraining_model(pca).save_pretrained(tmp_path)
    loaded = LDAEForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.ldae.pca.components.dtype == torch.float32
    assert loaded.ldae.blocks[0].attention.qkv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.ldae.pca.components, reference)


# -- forward passes ------------------------------------------------------------------------------------------------


def test_output_shapes_and_order_for_every_class(images, pca):
    model = pretraining_model(pca)
    out = model(images, output_hidden_states=True, output_attentions=True)
    assert list(out.keys()) == ["loss", "logits", "noisy_pixel_values", "timesteps", "targets", "noisy_latents",
                                "hidden_states", "attentions"]
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4 and out.attentions[0].shape == (8, 4, 16, 16)
    as_tuple = model(images, timesteps=out.timesteps, return_dict=False)
    assert len(as_tuple) == 6 and as_tuple[1].shape == (8, 16, 192)

    features = LDAEModel(tiny_config())(images, output_hidden_states=True, output_attentions=True)
    assert list(features.keys()) == ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    assert features.last_hidden_state.shape == (8, 16, 32) and len(features.hidden_states) == 3
    torch.testing.assert_close(features.pooler_output, features.last_hidden_state.mean(1))

    classifier = LDAEForImageClassification(tiny_config(num_labels=10))
    logits = classifier(images, labels=torch.arange(8), output_hidden_states=True)
    assert logits.logits.shape == (8, 10) and logits.loss.ndim == 0 and list(logits.keys())[-1] == "hidden_states"
    assert isinstance(classifier.get_input_embeddings(), torch.nn.Conv2d)


def test_features_are_deterministic_in_every_mode(images, pca):
    for mode in ("clean", "pca", "noisy"):
        model = LDAEModel(tiny_config(feature_input=mode)).eval()
        model.set_pca(*pca)
        torch.testing.assert_close(model(images).pooler_output, model(images).pooler_output, rtol=0, atol=0)
    # feature_input="pca" feeds mu + V^T V (x - mu): the same as clean input of that projected image.
    model = LDAEModel(tiny_config(feature_input="pca")).eval()
    model.set_pca(*pca)
    mean, top = pca[0].float(), pca[1][:8].float()
    projected = unpatchify(mean + (patchify(images, 8) - mean) @ top.T @ top, 8, 32, 32)
    model.config.feature_input = "clean"
    expected = model(projected).pooler_output
    model.config.feature_input = "pca"
    torch.testing.assert_close(model(images).pooler_output, expected, atol=1e-5, rtol=1e-5)


def test_timesteps_change_the_features(images, pca):
    model = pretraining_model(pca)
    encoder = LDAEModel(tiny_config())
    encoder.load_state_dict(model.ldae.state_dict(), strict=False)
    assert not torch.allclose(encoder(images, timesteps=10).pooler_output, encoder(images, timesteps=500).pooler_output)
    torch.testing.assert_close(encoder(images).pooler_output, encoder(images, timesteps=torch.full((8,), 10)).pooler_output)


def test_sincos_positions_are_fixed_nonzero_and_recomputed_for_a_new_grid(images, pca, tmp_path):
    model = pretraining_model(pca)
    positions = model.ldae.embeddings.position_embeddings
    assert positions.abs().sum() > 0 and "position_embeddings" not in dict(model.named_parameters())
    model.save_pretrained(tmp_path)
    loaded = LDAEForPreTraining.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.ldae.embeddings.position_embeddings, positions)
    # Non-square input: an exact sin-cos table for the 3 x 5 grid, not an interpolation.
    wide = torch.nn.functional.interpolate(images, size=(24, 40))
    output = model(wide, interpolate_pos_encoding=True)
    assert output.logits.shape == (8, 15, 192) and output.noisy_pixel_values.shape == (8, 3, 24, 40)
    features = LDAEModel(tiny_config())(wide, interpolate_pos_encoding=True)
    assert features.last_hidden_state.shape == (8, 15, 32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x: m(x[:, :2]), r"`pixel_values` has shape \(8, 2, 32, 32\).*num_channels"),
        (lambda m, x: m(torch.zeros(2, 3, 30, 30), interpolate_pos_encoding=True), "divisible by patch_size 8"),
        (lambda m, x: m(torch.zeros(2, 3, 48, 48)), "configured for 32x32.*interpolate_pos_encoding=True"),
        (lambda m, x: m(x, noise=torch.zeros(8, 16, 7)), r"`noise` has shape \(8, 16, 7\), expected.*\(8, 16, 8\)"),
        (lambda m, x: m(x, timesteps=torch.full((8,), 1000)), r"`timesteps` = \[1000.*\[0, 1000\)"),
        (lambda m, x: m(x, timesteps=torch.zeros(3, dtype=torch.long)), r"`timesteps` has shape \(3,\)"),
        (lambda m, x: m(x, timesteps=torch.full((8,), 0.5)), "dtype torch.float32, expected integers"),
    ],
)
def test_bad_inputs_raise_clear_errors(images, pca, call, message):
    model = pretraining_model(pca)
    with pytest.raises(ValueError, match=message):
        call(model, images)


def test_eager_equals_sdpa_and_fp16_bf16_forward(images, pca):
    model = pretraining_model(pca)
    timesteps, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 16, 8)
    sdpa = model(images, timesteps=timesteps, noise=noise)
    assert model.config._attn_implementation == "sdpa" and sdpa.attentions is None
    model.set_attn_implementation("eager")
    eager = model(images, timesteps=timesteps, noise=noise)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        half = pretraining_model(pca).to(dtype)
        output = half(images.to(dtype), timesteps=timesteps, noise=noise)
        assert output.logits.dtype == dtype and torch.isfinite(output.loss)


def test_own_mlp_and_drop_path_equal_timm_layers():
    """The model file writes these two layers itself (remote code imports only torch and transformers); they must
    compute what timm's did, with the same random draws, so checkpoints and training runs are unchanged."""
    from timm.layers import DropPath, Mlp

    from modeling_ldae.modeling_ldae import LDAEDropPath, LDAEMlp

    config = tiny_config()
    ours = LDAEMlp(config)
    theirs = Mlp(32, 128, act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 16, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    outputs = []
    for layer in (LDAEDropPath(0.3), DropPath(0.3)):
        torch.manual_seed(0)
        outputs.append(layer.train()(x))
    assert torch.equal(outputs[0], outputs[1]) and (outputs[0] == 0).all(dim=(1, 2)).any()
    assert torch.equal(LDAEDropPath(0.3).eval()(x), x)


@pytest.mark.floor
def test_gradient_checkpointing_gives_the_same_gradients(images, pca):
    from modeling_ldae.pretraining import enable_activation_checkpointing

    timesteps, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 16, 8)
    gradients = []
    for checkpointing in (False, True):
        model = pretraining_model(pca).train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecated name on any supported transformers (5.25 warns)
                enable_activation_checkpointing(model)
            assert model.ldae.blocks[0].gradient_checkpointing
        model(images, timesteps=timesteps, noise=noise).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 20
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_torch_compile_fullgraph(images, pca):
    model = pretraining_model(pca)
    timesteps, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 16, 8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(images, timesteps=timesteps, noise=noise).loss,
                               model(images, timesteps=timesteps, noise=noise).loss)
    encoder = LDAEModel(tiny_config())
    compiled_encoder = torch.compile(encoder, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_encoder(images).pooler_output, encoder(images).pooler_output)


# -- save / load, re-split, merge ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pretraining(pca, tmp_path_factory):
    model = pretraining_model(pca)
    path = tmp_path_factory.mktemp("pretraining")
    model.save_pretrained(path)
    return model, path


@pytest.mark.floor
def test_save_load_equality_for_all_classes(images, saved_pretraining, tmp_path):
    model, path = saved_pretraining
    timesteps, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 16, 8)
    loaded = LDAEForPreTraining.from_pretrained(path).eval()
    torch.testing.assert_close(loaded(images, timesteps=timesteps, noise=noise).logits,
                               model(images, timesteps=timesteps, noise=noise).logits, rtol=0, atol=0)
    for cls, kwargs in ((LDAEModel, {}), (LDAEForImageClassification, {"num_labels": 5})):
        first = cls.from_pretrained(path, **kwargs).eval()
        first.save_pretrained(tmp_path / cls.__name__)
        second = cls.from_pretrained(tmp_path / cls.__name__).eval()
        a, b = first(images), second(images)
        key = "logits" if "logits" in a else "pooler_output"
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.floor
def test_pretraining_checkpoint_loads_into_every_class(images, saved_pretraining):
    model, path = saved_pretraining
    reference = model.ldae.state_dict()
    for cls in (LDAEModel, LDAEForImageClassification):
        loaded = cls.from_pretrained(path)
        backbone = loaded if cls is LDAEModel else loaded.ldae
        for name, tensor in backbone.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
        assert backbone.pca.is_fitted and all(not p.requires_grad for p in backbone.buffers())
    encoder = LDAEModel.from_pretrained(path).eval()
    # The encoder output is the stack run through its first num_hidden_layers blocks at t = 10.
    hidden = model.ldae.embeddings(images)
    conditioning = model.ldae.conditioning(torch.full((8,), 10))
    for block in model.ldae.blocks[:2]:
        hidden = block(hidden, conditioning)
    torch.testing.assert_close(encoder(images).last_hidden_state, hidden)


@pytest.mark.parametrize("depth", [1, 3])
def test_resplit_encoder_depth(images, saved_pretraining, depth):
    model, path = saved_pretraining
    encoder = LDAEModel.from_pretrained(path, num_hidden_layers=depth).eval()
    assert len(encoder.blocks) == depth
    for i in range(depth):  # block i of the encoder is block i of the pre-training stack, decoder blocks included
        torch.testing.assert_close(encoder.blocks[i].attention.qkv.weight, model.ldae.blocks[i].attention.qkv.weight)
    hidden = model.ldae.embeddings(images)
    conditioning = model.ldae.conditioning(torch.full((8,), 10))
    for block in model.ldae.blocks[:depth]:
        hidden = block(hidden, conditioning)
    torch.testing.assert_close(encoder(images).last_hidden_state, hidden)


def test_missing_backbone_keys_fail_to_load(saved_pretraining, tmp_path):
    _, path = saved_pretraining
    with pytest.raises(ValueError, match=r"lacks backbone tensors that LDAEModel needs: blocks\.4\."):
        LDAEModel.from_pretrained(path, num_hidden_layers=5)
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, tmp_path / "no_pca")
    weights = load_file(tmp_path / "no_pca" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".pca." not in k}, tmp_path / "no_pca" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks backbone tensors.*pca\.components"):
        LDAEForImageClassification.from_pretrained(tmp_path / "no_pca")


@pytest.mark.floor
def test_merged_equals_unmerged_and_is_a_plain_vit(images, saved_pretraining, tmp_path):
    _, path = saved_pretraining
    classifier = LDAEForImageClassification.from_pretrained(path, num_labels=4).eval()
    before = classifier(images).logits
    classifier.merge_time_conditioning()
    torch.testing.assert_close(classifier(images).logits, before, atol=1e-5, rtol=1e-5)
    assert classifier.config.time_conditioning_merged and classifier.config.merged_timestep == 10
    assert classifier.ldae.time_embedder is None and all(b.adaLN_modulation is None for b in classifier.ldae.blocks)
    width = 32  # a plain pre-norm ViT block: 2 affine LayerNorms + attention + MLP
    vit_block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * 4 * width * width + 5 * width
    assert sum(p.numel() for p in classifier.ldae.blocks[0].parameters()) == vit_block
    with pytest.raises(ValueError, match="merged at t = 10"):
        classifier(images, timesteps=20)
    classifier.save_pretrained(tmp_path)
    reloaded = LDAEForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(images).logits, classifier(images).logits, rtol=0, atol=0)


@pytest.mark.floor
def test_merging_leaves_the_shared_config_and_every_other_model_as_they_were(pca, tmp_path):
    # Models built from one config share the object: merging one must not reach the others or the caller's.
    config = tiny_config(num_labels=3)
    encoder, pretraining, classifier = LDAEModel(config), LDAEForPreTraining(config), LDAEForImageClassification(config)
    encoder.merge_time_conditioning()
    classifier.merge_time_conditioning(timestep=20)
    assert not config.time_conditioning_merged and config.merged_timestep is None
    pretraining.set_pca(*pca)
    pretraining.save_pretrained(tmp_path / "pretraining")
    LDAEForPreTraining.from_pretrained(tmp_path / "pretraining")  # loads: its config was never merged
    for model, timestep in ((encoder, 10), (classifier, 20)):
        assert model.config is not config and model.config.merged_timestep == timestep
        holders = [module for module in model.modules() if hasattr(module, "config")]
        assert len(holders) > 3 and all(module.config is model.config for module in holders)
    # A refused merge changes nothing.
    with pytest.raises(ValueError, match="also holds the decoder"):
        pretraining.merge_time_conditioning()
    assert pretraining.config is config


def test_vit_base_merged_parameter_count():
    with torch.device("meta"):
        model = LDAEModel(LDAEConfig.from_preset("ldae-vit-base"))
        unmerged = sum(p.numel() for p in model.parameters())
        adaln = sum(p.numel() for n, p in model.named_parameters() if "adaLN" in n or "time_embedder" in n)
    merged_blocks = 12 * (2 * 2 * 768) - adaln  # merging adds the LayerNorm affines, removes adaLN + time embedder
    assert 85.5e6 < unmerged + merged_blocks < 86.5e6  # ViT-B/16's ~86M (no class token, fixed positions)


# -- Auto classes, remote code, pipelines --------------------------------------------------------------------------


@pytest.mark.floor
def test_auto_classes_with_the_package(saved_pretraining):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    _, path = saved_pretraining
    assert type(AutoConfig.from_pretrained(path)) is LDAEConfig
    assert type(AutoModel.from_pretrained(path)) is LDAEModel
    assert type(AutoModelForPreTraining.from_pretrained(path)) is LDAEForPreTraining
    assert type(AutoModelForImageClassification.from_pretrained(path)) is LDAEForImageClassification
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification",
                             "AutoBackbone"}


@pytest.mark.floor
def test_trust_remote_code_needs_only_torch_and_transformers(images, saved_pretraining, tmp_path):
    model, path = saved_pretraining
    checkpoint = shutil.copytree(path, tmp_path / "checkpoint")
    expected = LDAEModel.from_pretrained(path).eval()(images[:2]).pooler_output
    expected_maps = LDAEBackbone.from_pretrained(path, out_indices=[0, 2]).eval()(images[:2]).feature_maps
    torch.save(images[:2], tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import sys
        blocked = ("modeling_ldae", "timm", "PIL", "diffusers", "torchvision")
        for name in blocked:
            sys.modules[name] = None  # none is importable in this process
        import logging
        import torch
        from transformers import (AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification,
                                  AutoModelForPreTraining)
        encoder = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(encoder).__module__.startswith("transformers_modules"), type(encoder).__module__
        AutoModelForPreTraining.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        # The documented init under remote code too: MAE's fine-tuning head, DiT's adaLN-Zero on a fresh model.
        classifier = AutoModelForImageClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=True,
                                                                     num_labels=3)
        assert 1e-5 < classifier.classifier.weight.std().item() < 4e-5, classifier.classifier.weight.std()
        # AutoBackbone.from_pretrained takes Hub names only (every supported release): the class from auto_map, then its weights.
        config = AutoConfig.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        fresh = AutoModelForPreTraining.from_config(config, trust_remote_code=True)
        assert not fresh.final_layer.linear.weight.any() and not fresh.ldae.blocks[0].adaLN_modulation[-1].weight.any()
        backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
        backbone = backbone_class.from_pretrained({str(checkpoint)!r}, out_indices=[0, 2]).eval()
        images = torch.load({str(tmp_path / "images.pt")!r})
        torch.save((encoder(images).pooler_output, backbone(images).feature_maps), {str(tmp_path / "out.pt")!r})
        # Saving without Pillow writes the model and skips the image processor, with one warning.
        warnings = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = warnings.append
        logging.getLogger("transformers_modules").addHandler(handler)
        encoder.save_pretrained({str(tmp_path / "saved")!r})
        assert [record.getMessage() for record in warnings if "Pillow" in record.getMessage()] == [
            f"Pillow is not installed: {str(tmp_path / "saved")} holds the model without its image processor "
            "(`pip install pillow` to save one)."], [record.getMessage() for record in warnings]
        imported = {{name.split(".")[0] for name, module in sys.modules.items() if module is not None}}
        assert not imported & set(blocked), imported & set(blocked)
    """)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    pooled, maps = torch.load(tmp_path / "out.pt")
    assert {"config.json", "model.safetensors", "modeling_ldae.py"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    assert not (tmp_path / "saved" / "preprocessor_config.json").exists()
    torch.testing.assert_close(pooled, expected)
    for got, want in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(got, want)


def test_pipelines_on_a_saved_checkpoint(tiny_checkpoint, cifar10_train_images, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    pixels = ((cifar10_train_images[0][:2] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    pil_images = [Image.fromarray(p) for p in pixels]
    inputs = processor(pil_images, return_tensors="pt")["pixel_values"]
    assert inputs.shape == (2, 3, 32, 32) and -1 <= inputs.min() and inputs.max() <= 1

    extractor = pipeline("image-feature-extraction", model=str(tiny_checkpoint), pool=False)
    features = torch.tensor(extractor(pil_images[0]))
    encoder = LDAEModel.from_pretrained(tiny_checkpoint).eval()
    torch.testing.assert_close(features[0], encoder(inputs[:1]).last_hidden_state[0], atol=1e-5, rtol=1e-5)

    classifier = LDAEForImageClassification.from_pretrained(
        tiny_checkpoint, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}
    ).eval()
    classifier.save_pretrained(tmp_path)  # writes the evaluation image processor too
    assert AutoImageProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
    predictions = pipeline("image-classification", model=str(tmp_path))(pil_images, top_k=1)
    expected = classifier(inputs).logits.argmax(-1).tolist()
    assert [p[0]["label"] for p in predictions] == [classifier.config.id2label[i] for i in expected]


# -- it learns -----------------------------------------------------------------------------------------------------


def test_learns_to_denoise_real_images(cifar10_dir, cifar10_train_images):
    """A few hundred steps on real CIFAR-10: held-out loss at fixed (t, noise) clearly below copying the input."""
    from conftest import read_cifar10_images

    train, _ = cifar10_train_images
    held_out, _ = read_cifar10_images(cifar10_dir, "test", 128)
    torch.manual_seed(0)
    config = LDAEConfig.from_preset("ldae-tiny")
    model = LDAEForPreTraining(config)
    model.set_pca(*fit_patch_pca(train.split(128), config.patch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    timesteps = torch.linspace(0, 999, 128).long()
    noise = torch.randn(128, 16, config.pca_dim, generator=torch.Generator().manual_seed(1))

    def held_out_losses():
        model.eval()
        with torch.no_grad():
            output = model(held_out, timesteps=timesteps, noise=noise)
            copying = model.loss(patchify(held_out, 8), patchify(output.noisy_pixel_values, 8), timesteps)
        model.train()
        return output.loss.item(), copying.item()

    initial, copying = held_out_losses()
    for step in range(300):
        batch = train[torch.randint(0, len(train), (64,))]
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final, _ = held_out_losses()
    assert final < 0.8 * copying, (initial, final, copying)
    assert final < 0.5 * initial
