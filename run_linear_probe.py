#!/usr/bin/env python
"""Linear probe of an l-DAE checkpoint (MAE protocol, ldae-method.md section 7) on the `transformers` Trainer.

    python run_linear_probe.py --model_name_or_path path/or/hub-id --dataset_name ILSVRC/imagenet-1k \
        --output_dir probe --do_train --do_eval --per_device_train_batch_size 1024 [--cache_features]

Flags: those of transformers' run_image_classification.py and TrainingArguments, plus the protocol's
(`--help`); or one .json / .yaml file holding them. Multi-process: `accelerate launch run_linear_probe.py ...`.
"""

from pathlib import Path

from transformers import HfArgumentParser

from modeling_ldae.classification import (
    DataTrainingArguments,
    LinearProbeTrainingArguments,
    ModelArguments,
    parse_arguments,
    report_input_errors,
    run_linear_probe,
)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, LinearProbeTrainingArguments), prog=Path(__file__).name
    )
    with report_input_errors(parser.prog):
        model_args, data_args, training_args = parse_arguments(parser, argv)
        return run_linear_probe(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
