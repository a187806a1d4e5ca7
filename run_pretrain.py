#!/usr/bin/env python
"""l-DAE pre-training (or any `AutoModelForPreTraining` whose forward returns a loss, e.g. the ViTMAE baseline).

    accelerate launch run_pretrain.py --model_preset ldae-vit-base --output_dir out
    accelerate launch run_pretrain.py configs/pretrain/ldae-vit-base-400ep.yaml --output_dir out

A YAML or JSON file as first argument gives the arguments; flags after it override the file. The loop, the PCA
stage, checkpoints and monitoring live in `modeling_ldae.pretraining`; see docs/pretraining.md.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_ldae.cli import parse_arguments
from modeling_ldae.pretraining import DEFAULT_DATASET, NonFiniteLossError, Pretrainer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this pre-training checkpoint (local folder or Hub id)."}
    )
    model_type: str = field(
        default="ldae", metadata={"help": "ldae, or another AutoModelForPreTraining type (vit_mae for the MAE baseline)."}
    )
    model_preset: str | None = field(
        default=None,
        metadata={"help": "l-DAE size: ldae-vit-base (default), ldae-vit-half-large, ldae-vit-large, ldae-tiny."},
    )
    config_name: str | None = field(default=None, metadata={"help": "A config folder or file to build the model from."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields to change, e.g. 'pca_dim=16,drop_path_rate=0.1'."}
    )
    pca_from: str | None = field(
        default=None, metadata={"help": "Take the PCA tokenizer from this l-DAE checkpoint instead of fitting it."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})
    token: str | None = field(
        default=None,
        metadata={"help": "Hub access token (gated data sets such as ImageNet-1k); default: HF_TOKEN / hf auth login."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": f"Hub data set id or local data set folder (default: {DEFAULT_DATASET})."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Data set configuration name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "A local folder of images (class subfolders) or of parquet/arrow shards."}
    )
    train_split: str = field(default="train", metadata={"help": "The split to pre-train on."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "The image column (default: the first of image, img, jpg)."}
    )
    streaming: bool | None = field(
        default=None,
        metadata={"help": "true or false (default: true for Hub data sets, false for local ones)."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a stream, in examples."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    num_train_examples: int | None = field(
        default=None, metadata={"help": "Size of a stream whose info does not give it (turns epochs into steps)."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out split for the monitor images and k-NN queries (default: validation or test)."},
    )
    label_column_name: str | None = field(default=None, metadata={"help": "Label column for the k-NN monitor."})
    max_eval_samples: int = field(default=1000, metadata={"help": "k-NN query images."})
    example_id_column_name: str | None = field(
        default=None, metadata={"help": "Column with a unique id per example, for --log_example_ids."}
    )


@dataclass
class PretrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Checkpoints, logs, pictures and the final model."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Images per device per forward pass."})
    gradient_accumulation_steps: int = field(default=1)
    base_learning_rate: float = field(default=1e-4, metadata={"help": "lr = base_learning_rate x global batch / 256."})
    num_train_epochs: float = field(default=400)
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides --num_train_epochs."})
    num_warmup_epochs: float = field(default=100)
    num_warmup_steps: int | None = field(default=None, metadata={"help": "Overrides --num_warmup_epochs."})
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm (off by default)."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16 (default: the accelerate config's)."}
    )
    gradient_checkpointing: bool = field(default=False)
    torch_compile: bool = field(default=False)
    random_resized_crop: bool = field(
        default=False, metadata={"help": "Random resized crop + flip (final models) instead of center crop."}
    )
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0], metadata={"help": "Random resized crop scale."})
    dataloader_num_workers: int = field(default=8, metadata={"help": "Decoding processes per device."})
    dataloader_pin_memory: bool = field(default=True)
    dataloader_persistent_workers: bool = field(default=True, metadata={"help": "Map-style data only."})
    dataloader_prefetch_factor: int = field(default=4)
    seed: int = field(default=0)
    pca_num_images: int = field(default=20_000, metadata={"help": "Images sampled for the PCA fit."})
    pca_num_patches: int = field(default=2_560_000, metadata={"help": "Patches sampled for the PCA fit, in total."})
    num_pca_picture_components: int = field(default=64)
    logging_steps: int = field(default=50)
    monitor_steps: int | None = field(
        default=1000, metadata={"help": "Held-out loss on a fixed (t, noise) grid + denoising picture every N steps."}
    )
    monitor_timesteps: list[int] = field(default_factory=lambda: [10, 250, 500, 750, 999])
    num_monitor_images: int = field(default=64)
    num_picture_images: int = field(default=8)
    knn_eval_steps: int | None = field(default=None, metadata={"help": "k-NN top-1 of the features every N steps."})
    knn_train_samples: int = field(default=5000, metadata={"help": "Labelled training images in the k-NN bank."})
    checkpointing_steps: int | None = field(default=1000)
    checkpoints_total_limit: int = field(default=2)
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (newest in output_dir; none: start fresh)."}
    )
    log_example_ids: bool = field(default=False, metadata={"help": "Write the example ids each process trains on."})
    report_to: str = field(default="none", metadata={"help": "Extra Accelerate trackers: tensorboard, wandb, ..."})
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (default: the output folder name)."})
    hub_token: str | None = field(default=None)
    hub_private_repo: bool | None = field(default=None)


def parse_args(argv=None):
    return parse_arguments(HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments),
                                           prog="run_pretrain.py"), argv)


def _print_error(message: str):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run_pretrain.py: error: {message}", file=sys.stderr)


def main(argv=None, callbacks=()):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        pretrainer = Pretrainer(*parse_args(argv), callbacks=callbacks)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, before any work
        _print_error(str(error).splitlines()[0] if str(error) else repr(error))
        raise SystemExit(2) from None
    try:
        return pretrainer.train()
    except NonFiniteLossError as error:
        _print_error(str(error))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
