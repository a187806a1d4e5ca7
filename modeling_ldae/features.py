"""Frozen-encoder features of a data set: the one extraction behind the k-NN monitor, the cached-feature linear probe
and the CIFAR-10 study."""

from collections.abc import Callable, Iterable

import torch
from accelerate import Accelerator


@torch.inference_mode()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor] | None],
    accelerator: Accelerator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every batch (`{"pixel_values", "labels"}`; `None` batches, whose images all failed to
    decode, are skipped), as fp32 / long tensors on the CPU.

    `encode` maps pixel values to pooled features (e.g. `lambda x: model(x).pooler_output`; put the model in eval
    mode first). With an `accelerator`, `batches` is a loader it prepared: each process encodes its share under its
    autocast and every process gets all features, in order, without the repeats that even out the last batch.
    Without one, batches run on `device` (default: the CPU) in fp32."""
    device = accelerator.device if accelerator is not None else torch.device(device or "cpu")
    features, labels = [], []
    for batch in batches:
        if batch is None:
            continue
        pixel_values, batch_labels = batch["pixel_values"].to(device), batch["labels"].to(device)
        if accelerator is None:
            pooled = encode(pixel_values).float()
        else:
            with accelerator.autocast():
                pooled = encode(pixel_values).float()
            pooled, batch_labels = accelerator.gather_for_metrics((pooled, batch_labels))
        features.append(pooled.cpu())
        labels.append(batch_labels.cpu())
    if not features:
        raise ValueError("No batch to extract features from: the data is empty or no image could be decoded.")
    return torch.cat(features), torch.cat(labels)
