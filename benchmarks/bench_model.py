"""Training throughput of `LDAEForPreTraining` against a bare pre-norm ViT stack of the same size, in one process.

The bare stack is timm's `VisionTransformer` with the same total depth (encoder + decoder), width, heads, MLP ratio
and token count (no class token), trained on a plain feature loss: the ratio says what adaLN time conditioning, the
fp32 PCA noise and the weighted loss cost on top of the transformer itself. Targets: >= 0.90 eager on CPU,
>= 0.95 compiled on a GPU.

    python benchmarks/bench_model.py --preset ldae-tiny --batch_size 64
    python benchmarks/bench_model.py --preset ldae-vit-base --batch_size 2 --steps 3
    python benchmarks/bench_model.py --preset ldae-tiny --set image_size=64 hidden_size=192 num_attention_heads=3
    python benchmarks/bench_model.py --preset ldae-vit-base --batch_size 64 --device cuda --dtype bfloat16 --compile
"""

import argparse
import json
import time
from functools import partial

import timm
import torch
from transformers.activations import ACT2CLS

from modeling_ldae import LDAEConfig, LDAEForPreTraining


def build_ldae(config: LDAEConfig) -> torch.nn.Module:
    model = LDAEForPreTraining(config)
    dim = config.patch_dim
    # Any orthonormal basis gives the same cost; fitting one is not what is measured.
    basis = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))[0].T
    model.set_pca(torch.zeros(dim), basis, torch.linspace(1.0, 0.01, dim))
    return model


def build_bare_vit(config: LDAEConfig) -> torch.nn.Module:
    activation = ACT2CLS[config.hidden_act]
    act_layer = partial(activation[0], **activation[1]) if isinstance(activation, tuple) else activation
    return timm.models.VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers + config.decoder_num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        class_token=False,
        global_pool="avg",
        num_classes=0,
        act_layer=act_layer,  # the same MLP activation (DiT's tanh GELU), so only l-DAE's additions differ
    )


def images_per_second(model, step_loss, images, steps: int, warmup: int, dtype, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = step_loss(model, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * images.shape[0] / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ldae-tiny")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides on the preset, e.g. image_size=64 (values as JSON)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="also measure both under torch.compile")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    overrides, known = {}, LDAEConfig().to_dict()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY an LDAEConfig field, e.g. image_size=64")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string, e.g. hidden_act=gelu
    config = LDAEConfig.from_preset(args.preset, **overrides)
    images = torch.rand(args.batch_size, config.num_channels, config.image_size, config.image_size, device=device) * 2 - 1
    candidates = {
        "ldae": (build_ldae(config).to(device).train(), lambda m, x: m(x).loss),
        "bare ViT": (build_bare_vit(config).to(device).train(), lambda m, x: m(x).float().square().mean()),
    }
    modes = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    print(f"{args.preset}: {config.num_hidden_layers}+{config.decoder_num_hidden_layers} blocks @ "
          f"{config.hidden_size}, {(config.image_size // config.patch_size) ** 2} tokens, batch {args.batch_size}, "
          f"{args.dtype}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for mode, compiled in modes:
        rates = {name: [] for name in candidates}
        runners = {name: (torch.compile(model) if compiled else model, loss) for name, (model, loss) in candidates.items()}
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            for name, (model, loss) in runners.items():
                rates[name].append(images_per_second(model, loss, images, args.steps, args.warmup, dtype, device))
        median = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
        print(f"  {mode:9s} ldae {median['ldae']:8.1f} img/s | bare ViT {median['bare ViT']:8.1f} img/s | "
              f"ratio {median['ldae'] / median['bare ViT']:.3f}")


if __name__ == "__main__":
    main()
