"""l-DAE for `transformers`: importing this package registers the model with the Auto classes."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_ldae import JOURNEY_STAGES, PRESETS, LDAEConfig
from .modeling_ldae import (
    LDAEBackbone,
    LDAEForImageClassification,
    LDAEForPreTraining,
    LDAEForPreTrainingOutput,
    LDAEModel,
    LDAEPreTrainedModel,
    patchify,
    unpatchify,
)
from .pca import PatchPCAAccumulator, explained_variance_ratio, fit_patch_pca
from .scheduling_ldae import LDAENoiseScheduler

AUTO_CLASSES = {
    "AutoModel": LDAEModel,
    "AutoModelForPreTraining": LDAEForPreTraining,
    "AutoModelForImageClassification": LDAEForImageClassification,
    "AutoBackbone": LDAEBackbone,
}

AutoConfig.register(LDAEConfig.model_type, LDAEConfig, exist_ok=True)
AutoModel.register(LDAEConfig, LDAEModel, exist_ok=True)
AutoModelForPreTraining.register(LDAEConfig, LDAEForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(LDAEConfig, LDAEForImageClassification, exist_ok=True)
AutoBackbone.register(LDAEConfig, LDAEBackbone, exist_ok=True)

# `save_pretrained` copies the flat code files and writes `auto_map`, so checkpoints also load with
# `trust_remote_code=True` where this package is not installed.
LDAEConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)

__all__ = [
    "JOURNEY_STAGES",
    "PRESETS",
    "LDAEBackbone",
    "LDAEConfig",
    "LDAEForImageClassification",
    "LDAEForPreTraining",
    "LDAEForPreTrainingOutput",
    "LDAEModel",
    "LDAENoiseScheduler",
    "LDAEPreTrainedModel",
    "PatchPCAAccumulator",
    "explained_variance_ratio",
    "fit_patch_pca",
    "patchify",
    "unpatchify",
]
