"""Export an l-DAE encoder as a timm `VisionTransformer`: the weight format timm-based detection code (ViTDet-style)
loads. Other frameworks need their own key conversion.

    python -m modeling_ldae.timm_export CHECKPOINT OUTPUT_DIR [--image_size 512] [--dynamic_img_size]
    ldae-export-timm CHECKPOINT OUTPUT_DIR            # the same, installed as a console script

The export is the encoder with its time conditioning merged at the feature time step (plain pre-norm blocks) and a
linear tokenizer in front of it (the PCA latent or projection, a patch AE / VAE latent) folded into the patch
embedding, so it takes images whatever the model's input; no class token, average pooling with no final or fc norm,
tanh GELU, and the exact sin-cos table of `image_size` as `pos_embed`; its pretrained config carries the l-DAE
preprocessing (mean / std 0.5, bicubic, crop 0.875). The folder gets `model.safetensors` and timm's `config.json`:

    model = timm.create_model("local-dir:OUTPUT_DIR", pretrained=True)

At `image_size` its pooled features equal the merged `LDAEModel`'s to fp32 rounding. At another size, export again
with that `--image_size`: `--dynamic_img_size` makes timm interpolate the table instead, close but not equal.
"""

import argparse
import copy
from pathlib import Path

import timm
import torch
from timm.models import VisionTransformer, save_for_hf

from .cli import InputError, report_errors
from .modeling_ldae import LDAEModel, LDAEPreTrainedModel, sincos_position_embeddings

TIMM_ARCHITECTURE = "vit_base_patch16_224"
# transformers' activation name -> timm's, for the activations that are the same function.
TIMM_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def merged_encoder(model_or_checkpoint: LDAEPreTrainedModel | str | Path) -> LDAEModel:
    """The encoder of any l-DAE model or checkpoint, time conditioning merged at the feature t, fp32, on the CPU.
    A model passed in is copied, never changed."""
    if isinstance(model_or_checkpoint, (str, Path)):
        if not Path(model_or_checkpoint).is_dir():
            raise InputError(f"{model_or_checkpoint} is not a folder: pass an l-DAE checkpoint folder or model.")
        encoder = LDAEModel.from_pretrained(model_or_checkpoint)
    elif isinstance(model_or_checkpoint, LDAEPreTrainedModel):
        encoder = copy.deepcopy(model_or_checkpoint.base_model)
        del encoder.blocks[encoder.config.num_hidden_layers:]  # a pre-training model's decoder
    else:
        raise InputError(f"export_to_timm takes an l-DAE model or checkpoint folder, not {type(model_or_checkpoint)}.")
    encoder = encoder.float().cpu().eval()
    if encoder.config.feature_input == "noisy":
        raise InputError(
            "This model's features use feature_input='noisy' (random latent noise inside the forward pass), which a "
            "timm ViT cannot reproduce: load it with feature_input='clean' or 'pca' to export the encoder."
        )
    if not encoder.config.time_conditioning_merged:
        encoder.merge_time_conditioning()
    return encoder.fold_tokenizer()  # also for a checkpoint merged before the fold existed


@torch.no_grad()
def export_to_timm(
    model_or_checkpoint: LDAEPreTrainedModel | str | Path,
    output_dir: str | Path | None = None,
    image_size: int | None = None,
    dynamic_img_size: bool = False,
) -> VisionTransformer:
    """The l-DAE encoder as a timm `VisionTransformer` (see the module docstring), written to `output_dir` if given.

    Args:
        image_size: the input size whose exact sin-cos table becomes `pos_embed` (default: the model's).
        dynamic_img_size: let the timm model take other sizes by interpolating `pos_embed` (approximate).
    """
    encoder = merged_encoder(model_or_checkpoint)
    config = encoder.config
    image_size = image_size or config.image_size
    if image_size % config.patch_size:
        raise InputError(f"image_size {image_size} is not a multiple of the patch size {config.patch_size}.")
    if config.denoiser_input != "pixels":
        raise InputError(f"This encoder takes the latent tokens of a {config.tokenizer_type} tokenizer, which are not "
                         "a linear map of each patch, so no patch embedding reproduces them: only models on a linear "
                         "tokenizer (PCA, identity, patch AE / VAE) or on pixels export to timm.")
    if config.hidden_act not in TIMM_ACTIVATIONS:
        raise InputError(f"hidden_act {config.hidden_act!r} has no timm equivalent here ({sorted(TIMM_ACTIVATIONS)}).")
    if config.layer_norm_eps != 1e-6:
        raise InputError(f"layer_norm_eps {config.layer_norm_eps} differs from timm's ViT LayerNorm eps (1e-6).")
    model_args = dict(
        img_size=image_size, patch_size=config.patch_size, in_chans=config.num_channels, embed_dim=config.hidden_size,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size, qkv_bias=config.qkv_bias,
        class_token=False, global_pool="avg", fc_norm=False, final_norm=False, num_classes=0,
        act_layer=TIMM_ACTIVATIONS[config.hidden_act], dynamic_img_size=dynamic_img_size,
    )
    # A registered name so that timm's config.json can name the architecture; every size argument is overridden.
    vit = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **model_args)
    grid = image_size // config.patch_size
    state = {
        "patch_embed.proj.weight": encoder.embeddings.patch_embeddings.weight,
        "patch_embed.proj.bias": encoder.embeddings.patch_embeddings.bias,
        "pos_embed": sincos_position_embeddings(config.hidden_size, grid, grid),
    }
    for index, block in enumerate(encoder.blocks):
        for name, tensor in block.state_dict().items():
            state[f"blocks.{index}.{name.replace('attention.', 'attn.')}"] = tensor
    vit.load_state_dict(state, strict=True)
    vit.eval()
    # l-DAE's preprocessing, not the borrowed architecture's ImageNet tag and licence.
    channels = config.num_channels
    vit.pretrained_cfg = dict(
        architecture=TIMM_ARCHITECTURE, tag="ldae", num_classes=0, first_conv="patch_embed.proj", classifier="head",
        input_size=(channels, image_size, image_size), fixed_input_size=not dynamic_img_size,
        interpolation="bicubic", mean=(0.5,) * channels, std=(0.5,) * channels, crop_pct=0.875, crop_mode="center",
    )
    if output_dir is not None:
        save_for_hf(vit, output_dir, safe_serialization=True)
    return vit


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="ldae-export-timm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an l-DAE checkpoint folder (pre-training, encoder or classifier)")
    parser.add_argument("output_dir", help="where model.safetensors and timm's config.json are written")
    parser.add_argument("--image_size", type=int, default=None, help="input size of the export (default: trained)")
    parser.add_argument("--dynamic_img_size", action="store_true", help="accept other sizes (interpolated positions)")
    args = parser.parse_args(argv)
    with report_errors(parser.prog):
        encoder = merged_encoder(args.checkpoint)
        vit = export_to_timm(encoder, args.output_dir, args.image_size, args.dynamic_img_size)
        size = vit.patch_embed.img_size
        images = torch.rand(2, encoder.config.num_channels, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            difference = (vit(images) - encoder(images, interpolate_pos_encoding=True).pooler_output).abs().max()
        print(f"{parser.prog}: wrote {args.output_dir} (timm VisionTransformer, {size[0]}x{size[1]}); pooled features "
              f"match the merged l-DAE encoder to max |difference| {difference:.2e}")


if __name__ == "__main__":
    main()
