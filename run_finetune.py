#!/usr/bin/env python
"""End-to-end fine-tuning of an l-DAE checkpoint (MAE protocol, docs/method.md "Recipes") on the `transformers` Trainer.

    python run_finetune.py --model_name_or_path path/or/hub-id --dataset_name ILSVRC/imagenet-1k \
        --output_dir finetune --do_train --do_eval --per_device_train_batch_size 128

The merged model (LayerNorm + Linear head), layer-wise lr decay, AdamW, drop path, RandAugment, random erasing,
MixUp/CutMix with soft-target cross-entropy, EMA (saved). Flags: those of transformers' run_image_classification.py
and TrainingArguments, plus the protocol's (`--help`); a .yaml / .json file of them may come first, flags after it
override it. Multi-process: `accelerate launch run_finetune.py ...`.
"""

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from transformers import HfArgumentParser

from modeling_ldae import hub
from modeling_ldae.classification import (
    ClassificationTrainer,
    DataTrainingArguments,
    FineTuneTrainingArguments,
    ModelArguments,
    ModelEmaCallback,
    check_trainer_arguments,
    default_layer_decay,
    describe_features,
    end_process_group,
    evaluate_with_predictions,
    image_collator,
    last_checkpoint,
    load_classifier,
    load_data,
    log_and_save_metrics,
    setup_logging,
    soft_target_cross_entropy,
    take_over_push,
    topk_metrics,
    write_classifier_card,
)
from modeling_ldae.cli import parse_arguments, report_errors
from modeling_ldae.data import eval_transform, finetune_train_transform
from modeling_ldae.evaluation import preprocess_logits_for_metrics
from modeling_ldae.modeling_ldae import make_image_processor
from modeling_ldae.optim import layer_decay_param_groups
from modeling_ldae.ownership import own_output_dir

logger = logging.getLogger("run_finetune")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune with `argv` (default: the command line); returns the metrics, also in `all_results.json`."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FineTuneTrainingArguments), prog=Path(__file__).name
    )
    with report_errors(parser.prog), contextlib.ExitStack() as run:
        # Arguments; the output folder is this run's until it ends (no other launch can write there)
        model_args, data_args, training_args = parse_arguments(parser, argv)
        check_trainer_arguments(training_args)
        run.enter_context(own_output_dir(training_args.output_dir, parser.prog))
        repo_id = take_over_push(training_args)

        # Logging
        setup_logging(training_args)
        logger.info("Training/evaluation parameters %s", training_args)

        # Data: checked raw rows; each process decodes its own share in the collator
        data = load_data(model_args, data_args, training_args)

        # Model: the encoder with its time conditioning merged (a plain ViT) and the fine-tuning head
        model = load_classifier(model_args, data.class_names, "fine_tune", drop_path_rate=training_args.drop_path_rate)
        if not model.config.time_conditioning_merged:
            model.merge_time_conditioning()

        # Optimizer and schedule
        if training_args.do_train:
            training_args.set_schedule_lengths(data.num_train_examples)
        layer_decay = training_args.layer_decay or default_layer_decay(model.config)
        optimizer = torch.optim.AdamW(
            layer_decay_param_groups(model, training_args.learning_rate, training_args.weight_decay, layer_decay),
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
            eps=training_args.adam_epsilon,
        )
        mixup = None
        if training_args.mixup_alpha > 0 or training_args.cutmix_alpha > 0:
            mixup = Mixup(mixup_alpha=training_args.mixup_alpha, cutmix_alpha=training_args.cutmix_alpha,
                          label_smoothing=training_args.label_smoothing_factor, num_classes=len(data.class_names))
        ema = ModelEmaCallback(training_args.model_ema_decay) if training_args.model_ema else None

        # Trainer
        size = model.config.image_size
        trainer = ClassificationTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=make_image_processor(size),
            data_collator=image_collator(
                finetune_train_transform(size, training_args.rand_augment, training_args.random_erasing), data,
                training=True,
            ),
            eval_data_collator=image_collator(eval_transform(size), data, training=False),
            optimizers=(optimizer, None),
            # Without MixUp/CutMix the Trainer's own label smoothing applies to class ids.
            compute_loss_func=soft_target_cross_entropy if mixup is not None else None,
            mixup=mixup,
            callbacks=[ema] if ema is not None else None,
            compute_metrics=topk_metrics(data.num_eval_examples),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        info = {"protocol": "fine_tune", "model_ema": training_args.model_ema}

        # Train
        results = {}
        if training_args.do_train:
            checkpoint = last_checkpoint(training_args)
            if ema is not None and checkpoint is not None:
                ema.resume_from(checkpoint)
            train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
            if data.num_train_examples is not None:
                train_metrics["train_samples"] = data.num_train_examples
            trainer.save_state()
            results |= log_and_save_metrics(trainer, "train", {**train_metrics, **info})

        # Evaluate: with EMA, the raw weights (eval_without_ema_*), then the EMA weights, which are the model saved
        eval_metrics = {}
        if ema is not None and training_args.do_train:
            if training_args.do_eval:
                raw = trainer.predict(data.eval, metric_key_prefix="eval_without_ema").metrics
                eval_metrics = {name: value for name, value in raw.items() if name.endswith(("top1", "top5", "loss"))}
            trainer.model.load_state_dict(ema.ema.module.state_dict())
        if training_args.do_eval:
            eval_metrics |= evaluate_with_predictions(trainer, data.eval, data.num_eval_examples)
            results |= log_and_save_metrics(trainer, "eval", {**eval_metrics, **info})

        # Save, model card, push
        if training_args.do_train:
            trainer.save_model()
            if training_args.should_save:
                description = (
                    f"End-to-end fine-tuning (MAE protocol) of an l-DAE encoder, time conditioning merged at "
                    f"t = {model.config.merged_timestep}: {describe_features(model.config)}; LayerNorm + Linear "
                    f"head. AdamW (lr {training_args.learning_rate:g}, batch {training_args.global_batch_size}, "
                    f"weight decay {training_args.weight_decay:g}), layer decay {layer_decay:g}, "
                    f"{training_args.num_train_epochs:g} epochs, {training_args.warmup_epochs:g} warm-up, cosine; "
                    f"drop path {training_args.drop_path_rate:g}, RandAugment {training_args.rand_augment}, random "
                    f"erasing {training_args.random_erasing:g}, MixUp {training_args.mixup_alpha:g} / CutMix "
                    f"{training_args.cutmix_alpha:g}, label smoothing {training_args.label_smoothing_factor:g}"
                    + (f", EMA {training_args.model_ema_decay:g}: the saved weights are the EMA (eval_*; "
                       "eval_without_ema_* are the raw weights)." if ema is not None else ".")
                )
                write_classifier_card("fine_tune", description, model.config, model_args, data_args,
                                      training_args, data, results)
                if repo_id is not None:
                    hub.push_to_hub(training_args.output_dir, repo_id, token=training_args.hub_token,
                                    private=training_args.hub_private_repo)
        end_process_group(trainer)
        return results


if __name__ == "__main__":
    main()
