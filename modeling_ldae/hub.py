"""Model cards, Hub ids and Hub upload of trained models, shared by the three scripts.

The scripts upload with `push_to_hub` here, not with `Trainer.push_to_hub`, which would regenerate README.md over
the card written by `write_model_card`.
"""

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .cli import InputError

# Checkpoints (optimizer state, RNG) and unfinished temporary folders are not part of the model.
IGNORE_PATTERNS = ["checkpoint*", "*/checkpoint*", ".tmp*", "*/.tmp*", ".ldae-owner*"]  # run state


def hub_id(name: str | os.PathLike | None) -> str | None:
    """`name` if it can only be a Hub id (card metadata links Hub models and data sets), None for local paths."""
    if name is None:
        return None
    name = str(name)
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def repo_id(hub_model_id: str | None, output_dir: str | os.PathLike) -> str:
    """The repository to upload to: `--hub_model_id`, else the output folder's name; checked before any training,
    so that a bad id cannot fail the upload after a long run."""
    name = hub_model_id or Path(output_dir).resolve().name
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise InputError(f"--hub_model_id {name!r} is not a valid Hub repository id ({error}): pass "
                         "--hub_model_id <user or organisation>/<name>.") from None
    return name


# The paper, linked from every l-DAE card (the Hub lists a model under a paper from its `arxiv:` tag).
PAPER_ID = "2401.14404"
CITATION = """@inproceedings{chen2025deconstructing,
  title     = {Deconstructing Denoising Diffusion Models for Self-Supervised Learning},
  author    = {Chen, Xinlei and Liu, Zhuang and Xie, Saining and He, Kaiming},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2401.14404},
}"""
LICENSE = "apache-2.0"  # the project's (setup.cfg): the code the checkpoints carry for `trust_remote_code`


@dataclass(frozen=True)
class CardDataset:
    """The data a result was measured on, as model-index names it: a Hub data set by its id, local data as
    `imagefolder` (the type the Hub gives a folder of images) with the folder's name."""

    type: str
    name: str
    split: str | None
    config: str | None = None

    @classmethod
    def of(cls, name: str | os.PathLike, split: str | None, config_name: str | None = None) -> "CardDataset":
        hub_name = hub_id(name)
        if hub_name is None:
            return cls("imagefolder", Path(name).expanduser().resolve().name, split)
        return cls(hub_name, hub_name, split, config_name)


def accuracy_result(value: float, metric_name: str, task_name: str, dataset: CardDataset, *, top_k: int = 1,
                    **metric_args: Any) -> EvalResult:
    """One accuracy (a fraction) of an image-classification evaluation as a model-index entry; top-5 has its own
    metric type, so that it is never read as the top-1 of the same data set."""
    return EvalResult(
        task_type="image-classification", task_name=task_name, dataset_type=dataset.type, dataset_name=dataset.name,
        dataset_config=dataset.config, dataset_split=dataset.split,
        metric_type="accuracy" if top_k == 1 else f"top_{top_k}_accuracy", metric_name=metric_name,
        metric_value=float(value), metric_args=metric_args or None,
    )


def declared_requirement(package: str) -> str:
    """`package` with the version range ldae declares for it (`transformers>=5.17,<6`), from the installed
    metadata; the bare name where ldae is not installed (run from a source tree)."""
    try:
        declared = importlib.metadata.requires("ldae") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    for line in declared:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == canonicalize_name(package):
            bounds = sorted(map(str, requirement.specifier), key=lambda bound: not bound.startswith(">"))
            return requirement.name + ",".join(bounds)  # lower bound first
    return package


def _usage(repo: str, pipeline_tag: str, is_ldae: bool) -> str:
    if not is_ldae:
        return f'```python\nfrom transformers import AutoModel\n\nmodel = AutoModel.from_pretrained("{repo}")\n```\n'
    if pipeline_tag == "image-classification":
        call = (f'classifier = pipeline("image-classification", model="{repo}"{{remote}})\n'
                'predictions = classifier("image.jpg")  # the top classes and their scores\n')
        imports = "from transformers import pipeline\n"
    else:
        call = (f'processor = AutoImageProcessor.from_pretrained("{repo}")\n'
                f'model = AutoModel.from_pretrained("{repo}"{{remote}})\n'
                'features = model(**processor(images=image, return_tensors="pt")).pooler_output  '
                '# (batch, hidden_size)\n')
        imports = "from transformers import AutoImageProcessor, AutoModel\n"
    return (
        "Without the `ldae` package: the checkpoint carries its model code, which `transformers` runs when asked "
        "to.\n\n```python\n" + imports + "\n" + call.format(remote=", trust_remote_code=True") + "```\n\n"
        "With the `ldae` package installed, importing it registers l-DAE with the `transformers` Auto classes, so "
        "no remote code runs:\n\n```python\nimport modeling_ldae\n" + imports + "\n" + call.format(remote="")
        + "```\n"
    )


def _requirements(config) -> str:
    needs = [declared_requirement("torch"), declared_requirement("transformers")]
    text = "`" + "`, `".join(needs) + f"`; the image processor needs `{declared_requirement('pillow')}`"
    if getattr(config, "tokenizer_type", None) == "conv_vae":
        text += (f"; loading it needs `diffusers` (`{declared_requirement('diffusers')}`): its tokenizer is a "
                 "convolutional VAE, `diffusers`' `AutoencoderKL` (`pip install 'ldae[diffusers]'`)")
    if config.model_type == "ldae":
        text += (". The `ldae` package (`pip install -e .` in a clone of the project) registers the model with the "
                 "Auto classes; its `export` extra adds ONNX export")
    return text + "."


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    config,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    pipeline_tag: str,
    tags: list[str],
    description: str,
    eval_results: Sequence[EvalResult] = (),
    figures: Mapping[str, Any],
    training_arguments: Mapping[str, Any],
) -> ModelCard:
    """Write `output_dir/README.md`, the one place cards are built: Hub metadata (license, library, pipeline, tags,
    data sets, the paper, `eval_results` as model-index), the description, usage with and without the package,
    requirements, results, the run's other `figures`, training arguments (JSON) and the citation. `model_name` is
    the Hub id the usage loads; `config` the model's (what it needs to load)."""
    is_ldae = config.model_type == "ldae"
    data = ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        datasets=datasets,
        tags=[*tags, f"arxiv:{PAPER_ID}"] if is_ldae else list(tags),
        model_name=model_name,
        eval_results=list(eval_results) or None,
    )
    results = "".join(
        f"| {result.task_name} | {result.dataset_name} | {result.dataset_split} | {result.metric_name} | "
        f"{_format(result.metric_value)} |\n" for result in eval_results
    )
    rows = "".join(f"| {name} | {_format(value)} |\n" for name, value in figures.items())
    arguments = json.dumps(dict(training_arguments), indent=2, sort_keys=True, default=str)
    paper = ("l-DAE is from Chen, Liu, Xie, He, *Deconstructing Denoising Diffusion Models for Self-Supervised "
             f"Learning* ([arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID}), ICLR 2025).\n\n") if is_ldae else ""
    card = ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {model_name}\n\n{description}\n\n{paper}"
        f"## Usage\n\n{_usage(model_name, pipeline_tag, is_ldae)}\n"
        f"## Requirements\n\n{_requirements(config)}\n\n"
        + (f"## Results\n\n| Task | Data set | Split | Metric | Value |\n|---|---|---|---|---|\n{results}\n"
           if results else "")
        + f"## Figures of the run\n\n| Name | Value |\n|---|---|\n{rows}\n"
        f"## Training arguments\n\n```json\n{arguments}\n```\n"
        + (f"\n## Citation\n\n```bibtex\n{CITATION}\n```\n" if is_ldae else "")
    )
    card.save(Path(output_dir) / "README.md")
    return card


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload l-DAE model",
) -> CommitInfo:
    """Create the model repo if needed and upload `output_dir` without checkpoints or temporary folders."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=IGNORE_PATTERNS,
    )
