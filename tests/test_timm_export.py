"""Export of the l-DAE encoder to timm's VisionTransformer: equal features, timm's own loaders, the CLI."""

import json

import pytest
import timm
import torch
from test_backbone import checkpoint, images  # noqa: F401 (module fixtures: a tiny checkpoint, 4 CIFAR-10 images)
from test_modeling import tiny_config

from modeling_ldae import JOURNEY_STAGES, LDAEForPreTraining, LDAEModel, fit_patch_pca
from modeling_ldae.timm_export import export_to_timm, main


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("timm_export")
    export_to_timm(checkpoint, path, dynamic_img_size=True)
    return path


def test_export_equals_the_merged_encoder_and_loads_with_timm(checkpoint, exported, images):  # noqa: F811
    encoder = LDAEModel.from_pretrained(checkpoint).eval()
    config = json.loads((exported / "config.json").read_text())
    assert config["model_args"] | {"class_token": False, "global_pool": "avg", "fc_norm": False, "final_norm": False,
                                   "act_layer": "gelu_tanh"} == config["model_args"]
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and config["pretrained_cfg"]["std"] == [0.5] * 3
    by_folder = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    by_file = timm.create_model("vit_base_patch16_224", pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors"))).eval()
    larger = torch.nn.functional.interpolate(images, size=(48, 48), mode="bicubic")
    with torch.no_grad():
        expected = encoder(images).pooler_output
        for vit in (by_folder, by_file):
            torch.testing.assert_close(vit(images), expected, atol=1e-5, rtol=1e-5)
        # Another size: timm interpolates the sin-cos table (close, not equal); an export at that size is exact.
        expected = encoder(larger, interpolate_pos_encoding=True).pooler_output
        interpolated = (by_folder(larger) - expected).abs().max().item()
        assert 1e-3 < interpolated < 0.5 * expected.abs().max().item(), interpolated
        torch.testing.assert_close(export_to_timm(checkpoint, image_size=48)(larger), expected, atol=1e-5, rtol=1e-5)


def test_export_takes_any_class_leaves_it_unchanged_and_refuses_what_timm_cannot_do(checkpoint, images):  # noqa: F811
    model = LDAEForPreTraining.from_pretrained(checkpoint).eval()
    vit = export_to_timm(model)
    assert len(vit.blocks) == 2 and not model.config.time_conditioning_merged and len(model.ldae.blocks) == 4
    with torch.no_grad():
        torch.testing.assert_close(vit(images), LDAEModel.from_pretrained(checkpoint)(images).pooler_output,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="feature_input='noisy'.*cannot reproduce"):
        export_to_timm(LDAEModel.from_pretrained(checkpoint, feature_input="noisy"))
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of the patch size 8"):
        export_to_timm(model, image_size=36)


def test_cli(checkpoint, tmp_path, capsys):  # noqa: F811
    main([str(checkpoint), str(tmp_path / "out"), "--image_size", "64"])
    assert "timm VisionTransformer, 64x64" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 64, 64]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err


# -- linear tokenizers folded into the patch embedding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pca(cifar10_train_images):
    return fit_patch_pca(cifar10_train_images[0][:256].split(128), patch_size=8)


def stage_3_model(stage: str, pca) -> LDAEForPreTraining:
    """A stage-3 model (latent tokens in) with a fitted PCA, or a learned tokenizer given random but non-trivial
    weights, bias and latent scale (so that the fold's layout, offset and scale all matter), and random adaLN."""
    torch.manual_seed(0)
    model = LDAEForPreTraining(tiny_config(**JOURNEY_STAGES[stage]))
    tokenizer = model.ldae.latent_tokenizer
    with torch.no_grad():
        if stage == "3-patch-pca":
            model.set_pca(*pca)
        else:
            tokenizer.encoder.weight.normal_(std=0.1)
            tokenizer.encoder.bias.normal_(std=0.5)
            tokenizer.latent_scale.fill_(1.7)
            if tokenizer.log_std is not None:
                tokenizer.log_std.normal_()  # the features read the posterior mean: no effect
        for name, parameter in model.named_parameters():
            if "adaLN_modulation" in name:
                parameter.normal_(std=0.05)
    return model.eval()


@pytest.mark.parametrize("stage", ["3-patch-pca", "3-patch-ae", "3-patch-vae"])
def test_a_latent_input_encoder_on_a_linear_tokenizer_exports_as_an_image_input_vit(stage, pca, images, tmp_path):
    model = stage_3_model(stage, pca)
    with torch.no_grad():
        expected = model.ldae(images).pooler_output  # latent tokens in, time-conditioned
        torch.testing.assert_close(export_to_timm(model)(images), expected, atol=1e-5, rtol=1e-5)
    # The merged model is the same ViT as an LDAEModel: it says so in its config, keeps its tokenizer, saves and loads.
    model.save_pretrained(tmp_path / "pretrained")
    with pytest.raises(ValueError, match="applies to a merged encoder"):
        LDAEModel.from_pretrained(tmp_path / "pretrained").fold_tokenizer()
    merged = LDAEModel.from_pretrained(tmp_path / "pretrained").merge_time_conditioning()
    config, tokenizer_type = merged.config, JOURNEY_STAGES[stage]["tokenizer_type"]
    assert (config.denoiser_input, config.feature_input, config.tokenizer_type) == ("pixels", "clean", tokenizer_type)
    assert not hasattr(merged.embeddings, "latent_embeddings") and merged.latent_tokenizer.is_fitted
    merged.save_pretrained(tmp_path / "merged")
    reloaded, info = LDAEModel.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        for encoder in (merged, reloaded.eval()):
            torch.testing.assert_close(encoder(images).pooler_output, expected, atol=1e-5, rtol=1e-5)


def test_the_pca_feature_input_folds_into_the_patch_embedding(checkpoint, images):  # noqa: F811
    projected = LDAEModel.from_pretrained(checkpoint, feature_input="pca").eval()
    with torch.no_grad():
        expected = projected(images).pooler_output
        clean = LDAEModel.from_pretrained(checkpoint)(images).pooler_output
        assert (expected - clean).abs().max() > 1e-2  # the projection changes the features: the fold has work to do
        torch.testing.assert_close(export_to_timm(projected)(images), expected, atol=1e-5, rtol=1e-5)
    assert projected.config.feature_input == "pca"  # the model passed in is left as it is


def test_a_conv_vae_latent_is_refused_in_one_line():
    model = LDAEModel(tiny_config(**JOURNEY_STAGES["3-conv-vae"], conv_vae_block_out_channels=[8, 8, 8]))
    with pytest.raises(ValueError, match=r"^This encoder takes the latent tokens of a conv_vae tokenizer, which are "
                                         r"not a linear map of each patch.*export to timm\.$"):
        export_to_timm(model)
