"""`LDAEBackbone` for dense heads, the attention implementations, and transformers' common model checks
(`ModelTesterMixin` in spirit: save/load, meta-device init, batching equivalence, determinism) on every class."""

import copy
import re

import pytest
import torch
from test_modeling import pretraining_model, tiny_config
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation
from transformers.initialization import no_init_weights

from modeling_ldae import (
    LDAEBackbone,
    LDAEConfig,
    LDAEForImageClassification,
    LDAEForPreTraining,
    LDAEModel,
    fit_patch_pca,
)
from modeling_ldae.configuration_ldae import JOURNEY_STAGES, TOKENIZER_TYPES

PYRAMID = [4, 8, 16, 32]  # ViTDet's strides; from 8 x 8 patches: 2x up, the map itself, 2x and 4x down


@pytest.fixture(scope="module")
def images(cifar10_train_images):
    return cifar10_train_images[0][:4]


@pytest.fixture(scope="module")
def checkpoint(cifar10_train_images, tmp_path_factory):
    """A pre-training checkpoint (tiny, fitted PCA, random adaLN so that every block computes something)."""
    pca = fit_patch_pca(cifar10_train_images[0][:256].split(128), patch_size=8)
    path = tmp_path_factory.mktemp("backbone_checkpoint")
    pretraining_model(pca).save_pretrained(path)
    return path


def as_maps(hidden_states, height, width):
    return [h.transpose(1, 2).reshape(h.shape[0], -1, height // 8, width // 8) for h in hidden_states]


# -- the backbone ----------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_feature_maps_are_the_encoder_hidden_states_at_any_size(checkpoint, images, tmp_path):
    backbone = LDAEBackbone.from_pretrained(checkpoint, out_indices=[0, 1, 2]).eval()
    encoder = LDAEModel.from_pretrained(checkpoint).eval()
    assert backbone.stage_names == ["stem", "stage1", "stage2"] and backbone.out_features == backbone.stage_names
    wide = torch.nn.functional.interpolate(images, size=(24, 40))  # non-square, not the trained 32 x 32
    for pixels in (images, wide):
        maps = backbone(pixels).feature_maps
        expected = encoder(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        assert [tuple(m.shape) for m in maps] == [(4, 32, *(s // 8 for s in pixels.shape[-2:]))] * 3
        for got, want in zip(maps, as_maps(expected, *pixels.shape[-2:])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Unselected, the backbone returns the last block: the encoder output itself.
    last = LDAEBackbone.from_pretrained(checkpoint).eval()
    assert last.out_features == ["stage2"] and len(last(images).feature_maps) == 1
    torch.testing.assert_close(last(images).feature_maps[0], as_maps([encoder(images).last_hidden_state], 32, 32)[0])
    # The merged (fixed-t, plain ViT) form gives the same maps, and saves and loads as such.
    before = backbone(wide).feature_maps
    backbone.merge_time_conditioning()
    for got, want in zip(backbone(wide).feature_maps, before):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    backbone.save_pretrained(tmp_path)
    reloaded = LDAEBackbone.from_pretrained(tmp_path).eval()
    assert reloaded.config.time_conditioning_merged and reloaded.out_features == backbone.out_features
    torch.testing.assert_close(reloaded(wide).feature_maps[2], backbone(wide).feature_maps[2], rtol=0, atol=0)


@pytest.mark.floor
def test_backbone_outputs_and_auto_class(checkpoint, images):
    backbone = LDAEBackbone.from_pretrained(checkpoint, out_features=["stage1"]).eval()
    outputs = backbone(images, output_hidden_states=True, output_attentions=True)
    assert list(outputs.keys()) == ["feature_maps", "hidden_states", "attentions"]
    assert len(outputs.hidden_states) == 3 and outputs.attentions[0].shape == (4, 4, 16, 16)
    assert list(backbone(images).keys()) == ["feature_maps"]
    as_tuple = backbone(images, return_dict=False)
    torch.testing.assert_close(as_tuple[0][0], outputs.feature_maps[0])
    # t is an input, as for LDAEModel; another t gives other maps.
    assert not torch.allclose(backbone(images, timesteps=500).feature_maps[0], outputs.feature_maps[0])
    assert type(AutoBackbone.from_config(LDAEConfig(**tiny_config().to_dict()))) is LDAEBackbone


def test_backbone_config_keys(checkpoint, tmp_path):
    config = tiny_config(out_features=["stem", "stage2"])
    assert config.out_indices == [0, 2] and tiny_config(out_indices=[-1]).out_features == ["stage2"]
    config.save_pretrained(tmp_path)
    assert LDAEConfig.from_pretrained(tmp_path).out_features == ["stem", "stage2"]
    # A pre-training config stores no selection, and stages follow the encoder depth, so re-splitting still loads.
    saved = LDAEConfig.from_pretrained(checkpoint)
    assert saved.out_features is None and saved.out_indices is None
    resplit = LDAEBackbone.from_pretrained(checkpoint, num_hidden_layers=3)
    assert resplit.stage_names == ["stem", "stage1", "stage2", "stage3"] and resplit.out_features == ["stage3"]
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        tiny_config(out_features=["stage3"])
    with pytest.raises(ValueError, match="`feature_pyramid_strides` = \\[4, 12\\].*powers of 2"):
        tiny_config(feature_pyramid_strides=[4, 12])
    with pytest.raises(ValueError, match="`out_features`.*one stage when feature_pyramid_strides is set"):
        tiny_config(feature_pyramid_strides=PYRAMID, out_indices=[1, 2])


def test_simple_feature_pyramid(checkpoint, images):
    backbone = LDAEBackbone.from_pretrained(checkpoint, feature_pyramid_strides=PYRAMID).eval()
    maps = backbone(images).feature_maps
    assert [tuple(m.shape) for m in maps] == [(4, 32, 8, 8), (4, 32, 4, 4), (4, 32, 2, 2), (4, 32, 1, 1)]
    assert backbone.channels == [32] * 4
    last = LDAEBackbone.from_pretrained(checkpoint).eval()(images).feature_maps[0]
    torch.testing.assert_close(maps[1], last)  # stride p: the last block's map itself
    torch.testing.assert_close(maps[2], torch.nn.functional.max_pool2d(last, 2))
    wide = backbone(torch.nn.functional.interpolate(images, size=(32, 64))).feature_maps
    assert [tuple(m.shape[-2:]) for m in wide] == [(8, 16), (4, 8), (2, 4), (1, 2)]


def test_upernet_with_the_pretrained_ldae_encoder(checkpoint, cifar10_train_images, tmp_path):
    """The encoder inside transformers' UperNet: pre-trained weights in, a per-pixel task learned, saved exactly."""
    backbone = LDAEBackbone.from_pretrained(checkpoint, feature_pyramid_strides=PYRAMID)
    config = UperNetConfig(backbone_config=backbone.config, num_labels=4, hidden_size=32, auxiliary_channels=16,
                           pool_scales=[1, 2])
    segmenter = UperNetForSemanticSegmentation(config)
    assert not torch.equal(segmenter.backbone.ldae.blocks[0].attention.qkv.weight,
                           backbone.ldae.blocks[0].attention.qkv.weight), "UperNet builds a random backbone"
    segmenter.backbone.load_state_dict(backbone.state_dict())  # how the pre-trained encoder gets in
    for name, tensor in LDAEModel.from_pretrained(checkpoint).state_dict().items():
        torch.testing.assert_close(segmenter.backbone.ldae.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    # Task: each pixel's brightness quartile on real CIFAR-10 images.
    images = cifar10_train_images[0][:256]
    brightness = images.mean(1)
    labels = torch.bucketize(brightness, torch.quantile(brightness.flatten(), torch.tensor([0.25, 0.5, 0.75])))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        batch = torch.randint(0, 256, (32,))
        loss = segmenter(images[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses

    segmenter.eval().save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images[:4]).logits, segmenter(images[:4]).logits, rtol=0, atol=0)


# -- attention implementations ---------------------------------------------------------------------------------------


def test_eager_sdpa_and_flex_attention_agree(checkpoint, images):
    model = LDAEModel.from_pretrained(checkpoint).eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # flex attention has no backward on the CPU
        reference = model(images).last_hidden_state
        for implementation in ("eager", "flex_attention", "sdpa"):
            model.set_attn_implementation(implementation)
            assert model.config._attn_implementation == implementation
            torch.testing.assert_close(model(images).last_hidden_state, reference, atol=1e-5, rtol=1e-5)
            # Weights asked for are always given (eager for that call), never a silent None.
            weights = model(images, output_attentions=True).attentions
            assert len(weights) == 2 and weights[0].shape == (4, 4, 16, 16)
            torch.testing.assert_close(weights[0].sum(-1), torch.ones(4, 4, 16))
    # Asked for by the config instead of the call (transformers then loads eager itself).
    loaded = LDAEModel.from_pretrained(checkpoint, output_attentions=True)
    assert loaded.config._attn_implementation == "eager" and len(loaded(images).attentions) == 2


@pytest.mark.floor
def test_backbone_leaves_the_callers_config_as_it_was():
    config = tiny_config()
    backbone = LDAEBackbone(config)
    assert backbone.out_features == ["stage2"] and config.out_features is None and config.out_indices is None
    assert LDAEModel(config).config.out_features is None


# -- transformers' common model checks, on every class -------------------------------------------------------------


def every_class():
    config = tiny_config(num_labels=3, out_indices=[1, 2])
    return [(LDAEModel, config), (LDAEForPreTraining, config), (LDAEForImageClassification, config),
            (LDAEForImageClassification, tiny_config(classifier_head="linear_probe")),
            (LDAEBackbone, config), (LDAEBackbone, tiny_config(feature_pyramid_strides=PYRAMID))]


@pytest.mark.parametrize("model_class, config", every_class(),
                         ids=["model", "pretraining", "fine-tune", "linear-probe", "backbone", "pyramid"])
@pytest.mark.floor
def test_common_model_checks(model_class, config, images, tmp_path):
    # Buffers: a model built with initialisation skipped holds what meta-device construction + init_weights gives.
    with no_init_weights():
        skipped = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = model_class(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    buffers = dict(from_meta.named_buffers())
    assert dict(skipped.named_buffers()).keys() == buffers.keys()
    for name, buffer in skipped.named_buffers():
        assert torch.equal(buffer, buffers[name]), name

    torch.manual_seed(0)
    model = model_class(copy.deepcopy(config)).eval()
    kwargs = {}
    if model_class is LDAEForPreTraining:  # fixed t and noise make pre-training deterministic
        model.set_pca(*fit_patch_pca([images], patch_size=8))
        kwargs = {"timesteps": torch.full((4,), 300), "noise": torch.randn(4, 16, 8)}
    with torch.no_grad():
        for parameter in model.parameters():  # adaLN-Zero and zero heads would make many outputs trivially equal
            parameter.add_(torch.randn_like(parameter) * 0.05)
    with torch.no_grad():
        first, second = model(images, **kwargs), model(images, **kwargs)
        single = model(images[:1], **{k: v[:1] for k, v in kwargs.items()})
    for key in first:
        values, again, alone = (v if isinstance(v, tuple) else (v,) for v in (first[key], second[key], single[key]))
        for batched, repeated, row in zip(values, again, alone):
            assert torch.equal(batched, repeated), f"{key} is not deterministic"
            if batched.ndim:
                torch.testing.assert_close(batched[:1], row, atol=1e-5, rtol=1e-5, msg=f"{key}: batch vs single")
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        output = reloaded(images, **kwargs)
    for key in first:
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (first[key], output[key]))):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key} after save / load")


TOKENIZER_CONFIGS = {  # one tiny config per tokenizer type, each at a journey stage that uses it
    "pca": {}, "identity": {"tokenizer_type": "identity", "pca_dim": 192},
    "patch_ae": JOURNEY_STAGES["3-patch-ae"], "patch_vae": JOURNEY_STAGES["3-patch-vae"],
    "conv_vae": JOURNEY_STAGES["3-conv-vae"],
}


@pytest.mark.parametrize("tokenizer_type", TOKENIZER_TYPES)
@pytest.mark.floor
def test_keep_in_fp32_modules_exist(tokenizer_type):
    # transformers' common test of the same name: every declared name matches a module of the state dict.
    config = tiny_config(**TOKENIZER_CONFIGS[tokenizer_type])
    assert config.tokenizer_type == tokenizer_type
    for model_class in (LDAEModel, LDAEForPreTraining, LDAEForImageClassification, LDAEBackbone):
        model = model_class(copy.deepcopy(config))
        names = list(model.state_dict())
        declared = model._keep_in_fp32_modules_strict
        assert declared == {"pca" if tokenizer_type in ("pca", "identity") else "tokenizer"}, model_class
        for module in [*model._keep_in_fp32_modules, *declared]:
            assert any(re.search(rf"(?:^|\.){module}(?:\.|$)", name) for name in names), (model_class, module)
