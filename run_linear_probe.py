#!/usr/bin/env python
"""Linear probe of an l-DAE checkpoint (MAE protocol, docs/method.md "Recipes") on the `transformers` Trainer.

    python run_linear_probe.py --model_name_or_path path/or/hub-id --dataset_name ILSVRC/imagenet-1k \
        --output_dir probe --do_train --do_eval --per_device_train_batch_size 1024 [--cache_features]

Frozen backbone in eval mode, BatchNorm (no affine) + Linear head, LARS; augmented images or, with
`--cache_features`, features extracted once. Flags: those of transformers' run_image_classification.py and
TrainingArguments, plus the protocol's (`--help`); a .yaml / .json file of them may come first, flags after it
override it. Multi-process: `accelerate launch run_linear_probe.py ...`.
"""

import contextlib
import logging
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from modeling_ldae import hub
from modeling_ldae.classification import (
    ClassificationTrainer,
    DataTrainingArguments,
    FeatureHead,
    LinearProbeTrainingArguments,
    ModelArguments,
    cached_features,
    check_trainer_arguments,
    describe_features,
    end_process_group,
    evaluate_with_predictions,
    feature_probe_trainer,
    image_collator,
    last_checkpoint,
    load_classifier,
    load_data,
    log_and_save_metrics,
    setup_logging,
    take_over_push,
    topk_metrics,
    write_classifier_card,
)
from modeling_ldae.cli import parse_arguments, report_errors
from modeling_ldae.data import eval_transform, probe_train_transform
from modeling_ldae.evaluation import preprocess_logits_for_metrics
from modeling_ldae.modeling_ldae import make_image_processor
from modeling_ldae.optim import build_lars
from modeling_ldae.ownership import own_output_dir

logger = logging.getLogger("run_linear_probe")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the probe with `argv` (default: the command line); returns the metrics, also in `all_results.json`."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, LinearProbeTrainingArguments), prog=Path(__file__).name
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

        # Model: the frozen encoder with the probe head
        model = load_classifier(model_args, data.class_names, "linear_probe")
        model.ldae.requires_grad_(False)

        # Optimizer and schedule
        if training_args.do_train:
            training_args.set_schedule_lengths(data.num_train_examples)
        lars = build_lars(model, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
                          momentum=training_args.lars_momentum, trust_coefficient=training_args.lars_trust_coefficient)

        # Trainer: the image trainer holds the whole classifier, the one saved; with --cache_features a second
        # trainer trains the same head on features of center crops, each image encoded once
        size = model.config.image_size
        image_trainer = ClassificationTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=make_image_processor(size),
            data_collator=image_collator(probe_train_transform(size), data, training=True),
            eval_data_collator=image_collator(eval_transform(size), data, training=False),
            optimizers=(lars, None),
            frozen_backbone=True,
            compute_metrics=topk_metrics(data.num_eval_examples),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        trainer, eval_dataset, num_eval_examples = image_trainer, data.eval, data.num_eval_examples
        if training_args.cache_features:
            train_features = (cached_features(image_trainer, data.train, data.num_train_examples)
                              if training_args.do_train else None)
            eval_dataset = (cached_features(image_trainer, data.eval, data.num_eval_examples)
                            if training_args.do_eval else None)
            num_eval_examples = None  # exactly the evaluation examples
            trainer = feature_probe_trainer(FeatureHead.of(model), train_features, eval_dataset, training_args, lars)
        mode = "cached_features" if training_args.cache_features else "augmented"
        info = {"protocol": "linear_probe", "probe_mode": mode}

        # Train
        results = {}
        if training_args.do_train:
            train_metrics = trainer.train(resume_from_checkpoint=last_checkpoint(training_args)).metrics
            if data.num_train_examples is not None:
                train_metrics["train_samples"] = data.num_train_examples
            trainer.save_state()
            results |= log_and_save_metrics(trainer, "train", {**train_metrics, **info})

        # Evaluate
        if training_args.do_eval:
            eval_metrics = evaluate_with_predictions(trainer, eval_dataset, num_eval_examples)
            results |= log_and_save_metrics(trainer, "eval", {**eval_metrics, **info})

        # Save, model card, push
        if training_args.do_train:
            image_trainer.save_model()
            if training_args.should_save:
                description = (
                    f"Linear probe (MAE protocol, {mode.replace('_', ' ')}) of a frozen l-DAE encoder: "
                    f"{describe_features(model.config)}; BatchNorm without affine + Linear head trained with LARS "
                    f"(lr {training_args.learning_rate:g}, batch {training_args.global_batch_size}, "
                    f"{training_args.num_train_epochs:g} epochs, {training_args.warmup_epochs:g} warm-up, cosine). "
                    + ("Features were extracted once from center crops, without augmentation."
                       if training_args.cache_features else "Training images: random resized crop + flip.")
                )
                write_classifier_card("linear_probe", description, model.config, model_args, data_args,
                                      training_args, data, results)
                if repo_id is not None:
                    hub.push_to_hub(training_args.output_dir, repo_id, token=training_args.hub_token,
                                    private=training_args.hub_private_repo)
        end_process_group(trainer)
        return results


if __name__ == "__main__":
    main()
