"""`torch.export` and ONNX export (`modeling_ldae.export`): one exported program takes other batch sizes and image
sizes than it was traced with, at every journey stage, and gives the eager model's outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_modeling import tiny_config
from torch.utils._pytree import tree_leaves

from modeling_ldae import JOURNEY_STAGES, LDAEBackbone, LDAEForImageClassification, LDAEModel, fit_patch_pca
from modeling_ldae.export import export, export_kwargs, export_onnx

TRACED_SHAPE = (2, 32, 32)  # batch, height, width of the example the program is traced with
OTHER_SHAPES = [(3, 24, 40), (1, 48, 16)]  # other batches, non-square, smaller and larger than the trained 32


@pytest.fixture(scope="module")
def pca(cifar10_train_images):
    return fit_patch_pca(cifar10_train_images[0][:256].split(128), patch_size=8)


def real_images(cifar10_train_images, batch: int, height: int, width: int) -> torch.Tensor:
    return F.interpolate(cifar10_train_images[0][:batch], size=(height, width), mode="bilinear", antialias=True)


def stage_models(stage: str, pca) -> dict:
    """The encoder (`LDAEModel`), the merged classifier and the backbone of one journey stage, sharing weights: a
    fitted PCA or a learned tokenizer with a latent scale (a zero scale would make its latent, and the input of a
    latent-space denoiser, all zeros), and random adaLN so that every block computes something."""
    torch.manual_seed(0)
    classifier = LDAEForImageClassification(tiny_config(num_hidden_layers=1, num_labels=10, **JOURNEY_STAGES[stage]))
    tokenizer = classifier.ldae.latent_tokenizer
    with torch.no_grad():
        if classifier.config.tokenizer_type == "pca":
            classifier.set_pca(*pca)
        else:
            tokenizer.latent_scale.fill_(0.5)
        for name, parameter in classifier.named_parameters():
            if "adaLN_modulation" in name:
                parameter.normal_(std=0.05)
    backbone = LDAEBackbone(copy.deepcopy(classifier.config))
    backbone.ldae.load_state_dict(classifier.ldae.state_dict())
    merged = copy.deepcopy(classifier).merge_time_conditioning()  # its own copy of the config
    return {"encoder": classifier.ldae.eval(), "merged classifier": merged.eval(), "backbone": backbone.eval()}


def assert_same_outputs(got, expected, atol: float = 1e-5):
    got, expected = tree_leaves(got), tree_leaves(expected.to_tuple())
    assert len(got) == len(expected)
    for got_tensor, expected_tensor in zip(got, expected):
        torch.testing.assert_close(torch.as_tensor(got_tensor), expected_tensor, rtol=0, atol=atol)


# What an exported encoder computes depends on the tokenizer and on what the denoiser reads (pixels, or the latent
# tokens); the stages' other keys (schedule, target) enter pre-training only. So one program per pair is traced, and
# checked against every stage of that pair.
STAGES_BY_GRAPH = {}
for _stage, _keys in JOURNEY_STAGES.items():
    STAGES_BY_GRAPH.setdefault(f"{_keys['tokenizer_type']}-{_keys['denoiser_input']}", []).append(_stage)


@pytest.mark.parametrize("stages", STAGES_BY_GRAPH.values(), ids=STAGES_BY_GRAPH)
def test_torch_export_takes_other_batches_and_image_sizes_at_every_stage(stages, pca, cifar10_train_images):
    # The merged classifier at l-DAE's stage only: what differs between stages, the tokenizer, is the encoder's.
    names = ["encoder", "backbone", *(["merged classifier"] if "4e" in stages else [])]
    traced = real_images(cifar10_train_images, *TRACED_SHAPE)
    first = stage_models(stages[0], pca)
    programs = {name: export(first[name], traced).module() for name in names}
    for stage in stages:  # the same weights (same seed), each stage's own config
        models = stage_models(stage, pca)
        for name in names:
            model, kwargs = models[name], export_kwargs(models[name])
            for shape in OTHER_SHAPES:
                pixel_values = real_images(cifar10_train_images, *shape)
                with torch.no_grad():
                    assert_same_outputs(programs[name](pixel_values, **kwargs), model(pixel_values, **kwargs))


@pytest.mark.parametrize("stage, name", [("4e", "merged classifier"), ("3-patch-vae", "backbone")])
def test_onnx_export_runs_in_onnxruntime_at_other_batches_and_image_sizes(stage, name, pca, cifar10_train_images,
                                                                          tmp_path):
    import onnxruntime  # the `export` extra, also in `test`
    model = stage_models(stage, pca)[name]
    export_onnx(model, real_images(cifar10_train_images, *TRACED_SHAPE), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["pixel_values"]
    assert [node.name for node in session.get_outputs()] == (["logits"] if name == "merged classifier"
                                                              else ["feature_maps.0"])
    for shape in OTHER_SHAPES:
        pixel_values = real_images(cifar10_train_images, *shape)
        with torch.no_grad():
            expected = model(pixel_values, **export_kwargs(model))
        assert_same_outputs(session.run(None, {"pixel_values": pixel_values.numpy()}), expected, atol=1e-4)


def test_export_refuses_a_training_model_and_sizes_it_cannot_trace(pca, cifar10_train_images):
    encoder = stage_models("4e", pca)["encoder"]
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        export(encoder.train(), real_images(cifar10_train_images, *TRACED_SHAPE))
    with pytest.raises(ValueError, match=r"multiples of the patch \(8\), at least 16"):
        export(encoder.eval(), real_images(cifar10_train_images, 2, 8, 32))
    noisy = LDAEModel(tiny_config(num_hidden_layers=1, feature_input="noisy")).eval()
    with pytest.raises(ValueError, match="feature_input='noisy' .* export with feature_input 'clean'"):
        export(noisy, real_images(cifar10_train_images, *TRACED_SHAPE))
