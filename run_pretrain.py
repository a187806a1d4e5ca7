#!/usr/bin/env python
"""l-DAE pre-training (or any `AutoModelForPreTraining` whose forward returns a loss, e.g. the ViTMAE baseline).

    accelerate launch run_pretrain.py --model_preset ldae-vit-base --output_dir out
    accelerate launch run_pretrain.py configs/pretrain/ldae-vit-base-400ep.yaml --output_dir out

A YAML or JSON file as first argument gives the arguments; flags after it override the file. `pretrain` below is
the whole run, top to bottom (MAE's `main_pretrain.py`); the loop and its parts are in `modeling_ldae.pretraining`,
checkpoints in `modeling_ldae.checkpointing`, health signals in `modeling_ldae.monitors`. See docs/pretraining.md.
"""

import logging
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import GradientAccumulationPlugin, set_seed
from transformers import HfArgumentParser, get_scheduler

from modeling_ldae import checkpointing, hub, monitors, ownership, pretraining, tokenizers
from modeling_ldae.cli import InputError, parse_arguments, report_errors
from modeling_ldae.data import (
    EVAL_SPLIT_CANDIDATES,
    DecodingCollator,
    default_num_workers,
    find_label_column,
    pretrain_transform,
)
from modeling_ldae.optim import adamw_param_groups, schedule_lengths
from modeling_ldae.pretraining import (
    DEFAULT_DATASET,
    build_model,
    enable_activation_checkpointing,
    first_rows,
    fit_pca,
    make_train_loader,
    open_training_data,
    save_final_model,
    square_image_size,
    train_one_epoch,
    write_pretraining_card,
)

logger = logging.getLogger("run_pretrain")
PROG = "run_pretrain.py"


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
    journey_stage: str | None = field(
        default=None,
        metadata={"help": "A stage of the paper's deconstructive journey on top of the preset: 2c, 2d, 3-conv-vae, "
                  "3-patch-vae, 3-patch-ae, 3-patch-pca, 4a, 4b, 4c, 4d, 4e (= l-DAE). See docs/journey.md."},
    )
    tokenizer_from: str | None = field(
        default=None,
        metadata={"help": "Take the tokenizer (PCA or learned) from this run's tokenizer/ folder or l-DAE checkpoint "
                  "instead of fitting / training it (was --pca_from)."},
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
    train_split_name: str = field(default="train", metadata={"help": "The split to pre-train on."})
    eval_split_name: str | None = field(
        default=None,
        metadata={"help": "Held-out split for the monitor images and k-NN queries (default: validation, val, valid or "
                  "test, the first there is)."},
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "The image column (default: the first of image, img, jpg)."}
    )
    label_column_name: str | None = field(default=None, metadata={"help": "Label column for the k-NN monitor."})
    streaming: bool | None = field(
        default=None,
        metadata={"help": "true or false (default: true for Hub data sets, false for local ones)."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a stream, in examples."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    num_train_examples: int | None = field(
        default=None, metadata={"help": "Size of a stream whose info does not give it (turns epochs into steps)."}
    )
    max_eval_samples: int = field(default=1000, metadata={"help": "k-NN query images."})
    example_id_column_name: str | None = field(
        default=None, metadata={"help": "Column with a unique id per example, for --log_example_ids."}
    )


@dataclass
class PretrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Checkpoints, logs, pictures and the final model."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Images per device per forward pass."})
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate; default: base_learning_rate x global batch / 256."}
    )
    base_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate per 256 images of batch."})
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "After warm-up: cosine (half cosine to 0, the paper's), constant, linear, ... "
                  "(transformers.get_scheduler names; constant_with_warmup keeps intermediate checkpoints comparable)."},
    )
    num_train_epochs: float = field(default=400)
    max_steps: int | None = field(default=None, metadata={"help": "Total optimizer steps; overrides --num_train_epochs."})
    warmup_epochs: float = field(default=100)
    warmup_steps: int | None = field(default=None, metadata={"help": "Overrides --warmup_epochs."})
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm (off by default)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (default: the accelerate config's)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (default: the accelerate config's)."})
    mixed_precision: str | None = field(default=None, metadata={"help": "Deprecated: use --bf16 or --fp16."})
    gradient_checkpointing: bool = field(default=False)
    torch_compile: bool = field(default=False)
    random_resized_crop: bool = field(
        default=False, metadata={"help": "Random resized crop + flip (final models) instead of center crop."}
    )
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0], metadata={"help": "Random resized crop scale."})
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "Decoding processes per device (default: the cores per process less one, at "
                                "most 8)."}
    )
    dataloader_pin_memory: bool = field(default=True)
    dataloader_persistent_workers: bool = field(default=True, metadata={"help": "Map-style data only."})
    dataloader_prefetch_factor: int = field(default=4)
    seed: int = field(default=0)
    pca_num_images: int = field(default=20_000, metadata={"help": "Images sampled for the PCA fit."})
    pca_num_patches: int = field(default=2_560_000, metadata={"help": "Patches sampled for the PCA fit, in total."})
    tokenizer_max_steps: int = field(
        default=3000, metadata={"help": "Training steps of a learned tokenizer (patch AE / VAE, conv VAE) in stage 1."}
    )
    tokenizer_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of that training."})
    tokenizer_kl_weight: float | None = field(
        default=None, metadata={"help": "KL weight of a VAE tokenizer (default: 0.01 patch VAE, 1e-6 conv VAE)."}
    )
    tokenizer_only: bool = field(
        default=False, metadata={"help": "Stop after stage 1: fit / train the tokenizer, save <output_dir>/tokenizer."}
    )
    num_pca_picture_components: int = field(default=64)
    logging_steps: int = field(default=50)
    disable_tqdm: bool | None = field(
        default=None, metadata={"help": "Turn the progress bars off (true) or on (false); default: on only where "
                                "stderr is a terminal (a batch job's log gets the logged lines instead)."}
    )
    monitor_steps: int | None = field(
        default=1000, metadata={"help": "Held-out loss on a fixed (t, noise) grid + denoising picture every N steps."}
    )
    monitor_timesteps: list[int] = field(default_factory=lambda: [10, 250, 500, 750, 999])
    num_monitor_images: int = field(default=64)
    num_picture_images: int = field(default=8)
    knn_eval_steps: int | None = field(default=None, metadata={"help": "k-NN top-1 of the features every N steps."})
    knn_train_samples: int = field(default=5000, metadata={"help": "Labelled training images in the k-NN bank."})
    save_steps: int | None = field(default=1000, metadata={"help": "Checkpoint every N steps (0: never)."})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep the newest N checkpoints (>= 1; default, as in TrainingArguments: all)."}
    )
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
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments), prog="run_pretrain.py")
    return parse_arguments(parser, argv)


def check_arguments(model_args, args) -> None:
    """What the flags alone can get wrong, found before any work."""
    if not args.output_dir:
        raise InputError("--output_dir is required: the folder for checkpoints, logs and the final model.")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise InputError(f"--save_total_limit {args.save_total_limit} would delete the checkpoint just written: "
                         "pass 1 or more, or leave it unset to keep every checkpoint.")
    if args.bf16 and args.fp16:
        raise InputError("--bf16 and --fp16 are both set: choose one.")
    if args.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise InputError(f"--mixed_precision {args.mixed_precision!r}: use --bf16 or --fp16 (or neither).")
    if args.logging_steps < 1:
        raise InputError(f"--logging_steps {args.logging_steps}: pass 1 or more.")
    for flag in ("tokenizer_from", "journey_stage"):
        if getattr(model_args, flag) and model_args.model_type != "ldae":
            raise InputError(f"--{flag} applies to l-DAE models, not --model_type {model_args.model_type}: drop it.")
    if model_args.journey_stage and model_args.model_name_or_path:
        raise InputError("--journey_stage builds a new model; --model_name_or_path continues one (its config already "
                         "fixes the stage): drop one of them.")


def make_accelerator(args, output_dir: Path) -> Accelerator:
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if args.mixed_precision is not None:
        logger.warning("--mixed_precision is deprecated: use --bf16 or --fp16.")
        precision = args.mixed_precision
    report_to = [name.strip() for name in args.report_to.split(",") if name.strip() not in ("", "none")]
    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps,
            # Each process may end its epoch at a different batch (uneven stream shards): never let the end of a
            # dataloader force a gradient sync on one process only.
            sync_with_dataloader=False,
        ),
        mixed_precision=precision,
        dynamo_backend="inductor" if args.torch_compile else None,
        log_with=[monitors.JSONLinesTracker(output_dir / "logs"), *report_to],
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(
            # The default for iterable data sets reads and decodes everything on the main process.
            dispatch_batches=False, use_seedable_sampler=True, data_seed=args.seed,
            non_blocking=args.dataloader_pin_memory,  # overlap the host-to-device copy of pinned batches
        ),
        # Optimizer steps are counted once per process group, so the scheduler steps once per optimizer step.
        step_scheduler_with_optimizer=False,
    )


def make_monitors(model, data, data_args, args, accelerator) -> list[monitors.TrainingHook]:
    """The health signals that apply to this model: loss per noise bin, held-out denoising, k-NN, example ids."""
    hooks = [monitors.ExampleIdLog(Path(args.output_dir), accelerator.process_index)] if args.log_example_ids else []
    if model.config.model_type != "ldae":
        if args.knn_eval_steps:
            raise InputError(f"--knn_eval_steps monitors l-DAE features; this model is {type(model).__name__}: drop it.")
        return hooks
    config = model.config
    hooks.append(monitors.NoiseBinLosses(config, args.logging_steps))
    eval_split = evaluation_split(data, data_args)
    if args.monitor_steps:
        if not all(0 <= t < config.num_timesteps for t in args.monitor_timesteps):
            raise InputError(f"--monitor_timesteps {args.monitor_timesteps}: each t must be in [0, "
                             f"{config.num_timesteps}).")
        if eval_split is None:
            logger.warning("No validation/test split: the monitor images come from the training split (not held out).")
        rows = first_rows(data.source, eval_split or data_args.train_split_name, data.image_column,
                          args.num_monitor_images)
        hooks.append(monitors.HeldOutDenoising(rows, data.image_column, config, args.monitor_timesteps,
                                               args.monitor_steps, args.num_picture_images))
    if args.knn_eval_steps:
        if accelerator.distributed_type == "FSDP":
            raise InputError("--knn_eval_steps runs the encoder alone, which FSDP's sharded root cannot: drop it.")
        if not data_args.eval_split_name:
            raise InputError("--knn_eval_steps needs a labelled evaluation split: pass --eval_split_name (e.g. "
                             "validation).")
        label_column = find_label_column(data.source.load(eval_split, streaming=True), data_args.label_column_name)
        bank = first_rows(data.source, data_args.train_split_name, data.image_column, args.knn_train_samples,
                          label_column, shuffle_seed=args.seed)
        queries = first_rows(data.source, eval_split, data.image_column, data_args.max_eval_samples, label_column)
        hooks.append(monitors.KnnMonitor(bank, queries, data.image_column, label_column, config.image_size,
                                         args.knn_eval_steps, args.per_device_train_batch_size, accelerator))
    return hooks


def stage_one(model, model_args, data_args, args, data, image_size, num_workers, accelerator, output_dir) -> None:
    """The tokenizer: copied (`--tokenizer_from`), reused from this run's `tokenizer/`, or fitted / trained and
    saved there; its held-out figures beside the PCA's, and the PCA's picture."""
    split = evaluation_split(data, data_args)
    decode = DecodingCollator(pretrain_transform(image_size), data.image_column)

    def read_images(held_out: bool, count: int) -> torch.Tensor:
        chosen = (split if held_out else None) or data_args.train_split_name
        return decode(first_rows(data.source, chosen, data.image_column, count))["pixel_values"]

    fit = partial(fit_pca, model.config, data, image_size, args.pca_num_images, args.pca_num_patches,
                  args.per_device_train_batch_size, num_workers, args.seed, accelerator, args.disable_tqdm)
    loader = partial(make_train_loader, data, args, image_size, num_workers, accelerator.process_index)
    how, figures = tokenizers.prepare_tokenizer(model, model_args.tokenizer_from, fit, loader, read_images, args,
                                                accelerator, output_dir, model_args.cache_dir, model_args.token)
    tokenizers.log_figures(figures, accelerator)
    if model.config.tokenizer_type == "pca":
        monitors.report_pca(model, how, accelerator, output_dir, args.num_pca_picture_components)
    else:
        logger.info("Tokenizer (%s) %s.", model.config.tokenizer_type, how)


def evaluation_split(data, data_args) -> str | None:
    """`--eval_split_name`, else the first of validation, val, valid, test the data set has."""
    splits = data.source.splits()
    return data_args.eval_split_name or next((s for s in EVAL_SPLIT_CANDIDATES if s in splits), None)


def pretrain(model_args, data_args, args, hooks=()) -> monitors.LoopState | None:
    """The whole run: checks, the output folder taken (`modeling_ldae.ownership`), then `pretrain_into` it. Returns
    the final loop state; None when `--resume_from_checkpoint latest` finds the run finished."""
    check_arguments(model_args, args)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    ownership.check_one_job(accelerator.num_processes, PROG)
    # A requeued pre-emptible job (`latest`) waits for the run it replaces to save its last checkpoint.
    with ownership.own_output_dir(output_dir, PROG, wait_for_draining=args.resume_from_checkpoint == "latest") as owner:
        return pretrain_into(owner, accelerator, model_args, data_args, args, hooks)


def pretrain_into(owner: ownership.Ownership, accelerator: Accelerator, model_args, data_args, args,
                  hooks=()) -> monitors.LoopState | None:
    """Data, model, stage 1 (the tokenizer), stage 2 (the loop), the final model, in the folder `owner` holds."""
    output_dir = Path(args.output_dir)
    try:
        resume_from = checkpointing.resume_checkpoint(output_dir, args.resume_from_checkpoint)
    except checkpointing.RunFinished as finished:
        logger.warning("%s", finished)
        accelerator.end_training()
        return None
    set_seed(args.seed)
    model = build_model(model_args)
    image_size = square_image_size(model)
    data = open_training_data(data_args, model_args.token, model_args.cache_dir, args.seed, args.log_example_ids,
                              accelerator)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    max_steps, warmup_steps = schedule_lengths(data.num_examples, global_batch, args.num_train_epochs, args.max_steps,
                                               args.warmup_epochs, args.warmup_steps)
    learning_rate = args.learning_rate or args.base_learning_rate * global_batch / 256
    layout = {"num_processes": accelerator.num_processes, "gradient_accumulation_steps": args.gradient_accumulation_steps,
              "per_device_train_batch_size": args.per_device_train_batch_size}
    if resume_from is not None:
        checkpointing.check_resumable(resume_from, checkpointing.read_trainer_state(resume_from), model.config, layout)
    hooks = [*make_monitors(model, data, data_args, args, accelerator), *hooks]
    repo_id = hub.repo_id(args.hub_model_id, output_dir) if args.push_to_hub else args.hub_model_id or output_dir.name
    num_workers = args.dataloader_num_workers
    if num_workers is None:  # torchrun / accelerate launch say how many processes share this machine
        num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    arguments = {k: v for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()
                 if k not in ("token", "hub_token")}  # the card and the trackers show them: no secrets
    accelerator.init_trackers("ldae-pretraining", config=monitors.loggable(arguments))

    # Stage 1: the tokenizer (l-DAE only; a resumed run has it in its checkpoint, a checkpoint may bring one).
    if model.config.model_type == "ldae" and resume_from is None and (
            model_args.tokenizer_from or not model.ldae.latent_tokenizer.is_fitted):
        stage_one(model, model_args, data_args, args, data, image_size, num_workers, accelerator, output_dir)
    if args.tokenizer_only:
        logger.info("--tokenizer_only: stopping after stage 1; reuse the tokenizer with --tokenizer_from %s.",
                    output_dir)
        accelerator.end_training()
        return None

    # Stage 2: denoising.
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(adamw_param_groups(model, args.weight_decay), lr=learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                  fused=torch.cuda.is_available() or None)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, warmup_steps, max_steps)
    loader = make_train_loader(data, args, image_size, num_workers, accelerator.process_index)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = monitors.LoopState(accelerator, model, output_dir)
    if resume_from is not None:
        checkpointing.resume(state, resume_from)  # weights, optimizer, data position, every process's RNG states
    else:
        # The model samples t and noise from the global RNG: a different stream on every process. (Initial weights
        # came from the common seed; the data order has its own seeded generator.)
        set_seed(args.seed, device_specific=True)
    logger.info("Global batch %d (%d per device x %d processes x %d accumulation), lr %.3g, %d steps (%d warm-up), "
                "%s examples, %d decoding workers per process.", global_batch, args.per_device_train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps, learning_rate, max_steps, warmup_steps,
                data.num_examples if data.num_examples is not None else "unknown number of", num_workers)

    def save_checkpoint(state):
        owner.ensure_owned()
        state.last_checkpoint = checkpointing.save_checkpoint(
            accelerator, model, output_dir, state.step, (state.epoch, state.batch_in_epoch),
            {**layout, "last_loss": state.last_loss, "launch_id": owner.launch_id}, args.save_total_limit, image_size)

    window = pretraining.LossWindow(accelerator.device)
    with pretraining.StopRequest(on_signal=owner.drain) as stop, \
            monitors.ProgressBar(max_steps, state.step, accelerator, args.disable_tqdm) as bar:
        while state.step < max_steps and not stop.agreed:
            train_one_epoch(model, loader, optimizer, scheduler, state, window, args, max_steps, [*hooks, bar], stop,
                            save_checkpoint)
    if stop.agreed:
        save_checkpoint(state)
        accelerator.end_training()
        raise SystemExit(stop.exit_code)
    write_card = partial(write_pretraining_card, model=accelerator.unwrap_model(model), source=data.source,
                         repo_id=repo_id, steps=state.step, global_batch=global_batch, last_loss=state.last_loss,
                         knn=next((h.last_result for h in hooks if isinstance(h, monitors.KnnMonitor)), None),
                         knn_splits=(data_args.train_split_name, data_args.eval_split_name),
                         arguments=arguments)
    owner.ensure_owned()
    save_final_model(accelerator, model, output_dir, image_size, write_card)
    if args.push_to_hub and accelerator.is_main_process:
        info = hub.push_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info("Uploaded to %s", info.commit_url)
    # Ending the process group joins gloo's worker threads while the interpreter is alive: one still releasing a
    # collective's tensor at interpreter exit aborts the process ("terminate called without an active exception").
    accelerator.end_training()
    return state


def main(argv=None, hooks=()):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with report_errors(PROG):
        return pretrain(*parse_args(argv), hooks=hooks)


if __name__ == "__main__":
    main()
