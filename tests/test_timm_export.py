"""Export of the l-DAE encoder to timm's VisionTransformer: equal features, timm's own loaders, the CLI."""

import json

import pytest
import timm
import torch
from test_backbone import checkpoint, images  # noqa: F401 (module fixtures: a tiny checkpoint, 4 CIFAR-10 images)

from modeling_ldae import LDAEForPreTraining, LDAEModel
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
    with pytest.raises(ValueError, match="feature_input='pca'.*cannot reproduce"):
        export_to_timm(LDAEModel.from_pretrained(checkpoint, feature_input="pca"))
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of the patch size 8"):
        export_to_timm(model, image_size=36)


def test_cli(checkpoint, tmp_path, capsys):  # noqa: F811
    main([str(checkpoint), str(tmp_path / "out"), "--image_size", "64"])
    assert "timm VisionTransformer, 64x64" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 64, 64]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err
