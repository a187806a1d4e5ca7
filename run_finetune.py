#!/usr/bin/env python
"""End-to-end fine-tuning of an l-DAE checkpoint (MAE protocol, ldae-method.md section 7) on the `transformers` Trainer.

    python run_finetune.py --model_name_or_path path/or/hub-id --dataset_name ILSVRC/imagenet-1k \
        --output_dir finetune --do_train --do_eval --per_device_train_batch_size 128

Flags: those of transformers' run_image_classification.py and TrainingArguments, plus the protocol's
(`--help`); or one .json / .yaml file holding them. Multi-process: `accelerate launch run_finetune.py ...`.
"""

from pathlib import Path

from transformers import HfArgumentParser

from modeling_ldae.classification import (
    DataTrainingArguments,
    FineTuneTrainingArguments,
    ModelArguments,
    parse_arguments,
    report_input_errors,
    run_finetune,
)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FineTuneTrainingArguments), prog=Path(__file__).name
    )
    with report_input_errors(parser.prog):
        model_args, data_args, training_args = parse_arguments(parser, argv)
        return run_finetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
