"""Training throughput of `LDAEForPreTraining` against a bare pre-norm ViT stack of the same size, in one process.

The bare stack is timm's `VisionTransformer` with the same total depth (encoder + decoder), width, heads, MLP ratio
and token count (no class token), trained on a plain feature loss: the ratio says what adaLN time conditioning, the
fp32 PCA noise and the weighted loss cost on top of the transformer itself. Targets: >= 0.90 eager on CPU,
>= 0.95 compiled on a GPU.

With `--baseline_revision REV` the comparison is instead against `LDAEForPreTraining` as of git revision REV (its
configuration and modeling files, imported as a separate package), built from the same preset and `--set` overrides
(those its config knows) with the same weights and PCA: the ratio says what a modeling change costs the training step.

    python benchmarks/bench_model.py --preset ldae-tiny --batch_size 64
    python benchmarks/bench_model.py --preset ldae-vit-base --batch_size 2 --steps 3
    python benchmarks/bench_model.py --preset ldae-tiny --set image_size=64 hidden_size=192 num_attention_heads=3
    python benchmarks/bench_model.py --preset ldae-vit-base --batch_size 64 --device cuda --dtype bfloat16 --compile
    python benchmarks/bench_model.py --preset ldae-tiny --batch_size 64 --baseline_revision a7f5b5d
    python benchmarks/bench_model.py --preset ldae-tiny --batch_size 32 --journey_stage 2d  # conv VAE encoding cost
    OMP_NUM_THREADS=1 python benchmarks/bench_model.py --preset ldae-tiny --batch_size 32 --baseline_revision a7f5b5d \
        --set image_size=32 patch_size=8 hidden_size=192 num_hidden_layers=4 decoder_num_hidden_layers=4 \
        num_attention_heads=3 intermediate_size=768
"""

import argparse
import atexit
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import timm
import torch
from transformers.activations import ACT2CLS

from modeling_ldae import LDAEConfig, LDAEForPreTraining


def build_ldae(config: LDAEConfig) -> torch.nn.Module:
    model = LDAEForPreTraining(config)
    dim = config.patch_dim
    # Any orthonormal basis (or untrained tokenizer) gives the same cost; fitting one is not what is measured.
    if config.tokenizer_type == "pca":
        basis = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))[0].T
        model.set_pca(torch.zeros(dim), basis, torch.linspace(1.0, 0.01, dim))
    elif config.tokenizer_type != "identity":
        model.ldae.tokenizer.latent_scale.fill_(1.0)
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


def build_baseline(revision: str, preset: str, overrides: dict, current: torch.nn.Module) -> torch.nn.Module:
    """`LDAEForPreTraining` as of git `revision`, with `current`'s weights and PCA."""
    folder = Path(tempfile.mkdtemp(prefix="bench_model_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # kept until exit so tracebacks still show the source
    package = folder / "ldae_baseline"  # another name, so both versions are importable side by side
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_ldae.py", "modeling_ldae.py"):  # together: modeling imports the config relatively
        source = subprocess.check_output(["git", "show", f"{revision}:modeling_ldae/{name}"],
                                         cwd=Path(__file__).resolve().parents[1])
        (package / name).write_bytes(source)
    sys.path.insert(0, str(folder))
    old = importlib.import_module("ldae_baseline.modeling_ldae")
    known = old.LDAEConfig().to_dict()
    config = old.LDAEConfig.from_preset(preset, **{k: v for k, v in overrides.items() if k in known})
    # Strict loading only catches shape changes; a preset value that moved (say sigma_max) would skew the ratio unseen.
    current_values = current.config.to_dict()
    differing = {k: (current_values[k], v) for k, v in config.to_dict().items() if current_values.get(k, v) != v}
    ignored = sorted(set(overrides) - set(known))
    if differing or ignored:
        print(f"baseline {revision}: config differs (current, baseline): {differing}; --set keys it lacks: {ignored}")
    model = old.LDAEForPreTraining(config)
    model.load_state_dict(current.state_dict())  # strict: the default l-DAE's state-dict keys did not change
    return model


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
    parser.add_argument("--journey_stage", help="a stage of the journey (2c ... 4e) on top of the preset")
    parser.add_argument("--baseline_revision", metavar="REV",
                        help="compare against LDAEForPreTraining at this git revision instead of the bare ViT")
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
    if args.journey_stage and args.baseline_revision:
        parser.error("--baseline_revision measures the l-DAE step against an older version: drop --journey_stage")
    config = LDAEConfig.from_preset(args.preset, journey_stage=args.journey_stage, **overrides)
    images = torch.rand(args.batch_size, config.num_channels, config.image_size, config.image_size, device=device) * 2 - 1
    ldae = build_ldae(config)
    candidates = {"ldae": (ldae, lambda m, x: m(x).loss)}
    if args.baseline_revision:
        baseline = build_baseline(args.baseline_revision, args.preset, overrides, ldae)
        candidates["baseline"] = (baseline, lambda m, x: m(x).loss)
    else:
        candidates["bare ViT"] = (build_bare_vit(config), lambda m, x: m(x).float().square().mean())
    candidates = {name: (model.to(device).train(), loss) for name, (model, loss) in candidates.items()}
    modes = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    print(f"{args.preset}: {config.num_hidden_layers}+{config.decoder_num_hidden_layers} blocks @ "
          f"{config.hidden_size}, {(config.image_size // config.patch_size) ** 2} tokens, batch {args.batch_size}, "
          f"{args.dtype}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for mode, compiled in modes:
        rates = {name: [] for name in candidates}
        runners = {name: (torch.compile(model) if compiled else model, loss) for name, (model, loss) in candidates.items()}
        order = list(runners.items())
        for repeat in range(args.repeats):  # alternate (ABBA) so drift in machine load and going first hit both alike
            for name, (model, loss) in order if repeat % 2 == 0 else order[::-1]:
                rates[name].append(images_per_second(model, loss, images, args.steps, args.warmup, dtype, device))
        median = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
        if args.baseline_revision:
            current, base = median["ldae"], median["baseline"]
            print(f"  {mode:9s} current / baseline ({args.baseline_revision}): {current / base:.3f} "
                  f"(median of {args.repeats} alternating rounds: {current:.1f} vs {base:.1f} img/s)")
        else:
            print(f"  {mode:9s} ldae {median['ldae']:8.1f} img/s | bare ViT {median['bare ViT']:8.1f} img/s | "
                  f"ratio {median['ldae'] / median['bare ViT']:.3f}")


if __name__ == "__main__":
    main()
