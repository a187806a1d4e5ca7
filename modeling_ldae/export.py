"""`torch.export` and ONNX export of l-DAE models with a dynamic batch and image size.

`torch.export.export` and `torch.onnx.export(..., dynamo=True)` do the work; what this module adds is the one thing
they need to know about l-DAE: how its input may vary. Any batch size and any height and width that are multiples
of the patch (at least two patches a side: torch.export specialises a size of 1), so that one exported program
serves every size, as the eager model does (the sin-cos positions are computed from the grid inside the graph, and
the tokenizer of every journey stage is part of it). `LDAEModel` and the classifiers are exported as called with
`interpolate_pos_encoding=True`; `LDAEBackbone` takes any size anyway.

    program = export(model, example_pixel_values)              # torch.export.ExportedProgram
    program.module()(pixel_values, interpolate_pos_encoding=True)
    export_onnx(model, example_pixel_values, "ldae.onnx")      # input "pixel_values", outputs named as the model's

ONNX needs the `export` extra (`pip install 'ldae[export]'`: onnx, onnxscript, onnxruntime to run it).
"""

import inspect
import os
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from .modeling_ldae import LDAEPreTrainedModel

EXPORT_EXTRA = "pip install 'ldae[export]'"


def export_kwargs(model: LDAEPreTrainedModel) -> dict[str, Any]:
    """The keyword arguments the model is exported with (and the exported program is called with)."""
    return {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(
        model.forward).parameters else {}


def dynamic_shapes(model: LDAEPreTrainedModel) -> dict[str, Any]:
    """`dynamic_shapes` for `torch.export` / `torch.onnx.export`: batch, and height and width as multiples of the
    patch (a derived dimension: a free height would make the exporter prove divisibility it cannot)."""
    patch = model.config.patch_size
    pixel_values = {0: Dim("batch", min=1), 2: patch * Dim("grid_height", min=2), 3: patch * Dim("grid_width", min=2)}
    return {"pixel_values": pixel_values, **{name: None for name in export_kwargs(model)}}


def _check(model: LDAEPreTrainedModel, pixel_values: torch.Tensor) -> None:
    if model.training:
        raise ValueError("The model is in training mode (dropout, drop path, noisy tokenizer samples would be "
                         "traced): call model.eval() before exporting it.")
    if model.config.feature_input == "noisy":
        raise ValueError("feature_input='noisy' draws its fixed-seed noise with a torch.Generator, which torch.export "
                         "cannot trace at a dynamic size: export with feature_input 'clean' (the default) or 'pca'.")
    patch = model.config.patch_size
    if pixel_values.ndim != 4 or any(size % patch or size < 2 * patch for size in pixel_values.shape[-2:]):
        raise ValueError(f"The example `pixel_values` has shape {tuple(pixel_values.shape)}: pass (batch, channels, "
                         f"height, width) images whose height and width are multiples of the patch ({patch}), at "
                         f"least {2 * patch}.")


def export(model: LDAEPreTrainedModel, pixel_values: torch.Tensor) -> ExportedProgram:
    """`torch.export.export` of an l-DAE model (eval mode) traced on example `pixel_values`, dynamic in batch and
    image size. Call `program.module()` with `export_kwargs(model)` (`interpolate_pos_encoding=True` for all but
    the backbone); it returns the model's output class."""
    _check(model, pixel_values)
    return torch.export.export(model, (pixel_values,), export_kwargs(model), dynamic_shapes=dynamic_shapes(model))


def output_names(model: LDAEPreTrainedModel, pixel_values: torch.Tensor) -> list[str]:
    """The names of the model's output tensors in order (`feature_maps.0`, ... for tuples), for the ONNX graph."""
    with torch.no_grad():
        outputs = model(pixel_values, **export_kwargs(model))
    names = []
    for key, value in outputs.items():
        names += [f"{key}.{index}" for index in range(len(value))] if isinstance(value, tuple) else [key]
    return names


def export_onnx(model: LDAEPreTrainedModel, pixel_values: torch.Tensor, path: str | os.PathLike | None = None):
    """`torch.onnx.export(..., dynamo=True)` of an l-DAE model (eval mode) traced on example `pixel_values`, dynamic
    in batch and image size, with input `pixel_values` and outputs named as the model's; written to `path` if
    given. Returns the `torch.onnx.ONNXProgram`."""
    try:
        import onnxscript  # noqa: F401  (the exporter's own import error does not say which package to install)
    except ImportError:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {EXPORT_EXTRA}.") from None
    # Through `export`'s program: the same trace, and the constant `interpolate_pos_encoding` is gone from its inputs.
    program = torch.onnx.export(export(model, pixel_values), dynamo=True, input_names=["pixel_values"],
                                output_names=output_names(model, pixel_values), verbose=False)
    if path is not None:
        program.save(os.fspath(path))
    return program
