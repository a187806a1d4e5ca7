"""Exact, streaming fit of the patch-wise PCA tokenizer.

Hand-written because no library does what is needed here: scikit-learn's `IncrementalPCA` approximates (it is an
incremental SVD, not the exact covariance), keeps the data dtype and cannot sum partial results across processes.
Here each process accumulates the float64 sums of patches and of their outer products (constant memory in the number
of patches), the sums are added across processes, and one eigendecomposition gives the exact PCA.
"""

from collections.abc import Callable, Iterable

import torch

from .modeling_ldae import patchify


class PatchPCAAccumulator:
    """Running float64 sums (count, sum x, sum x x^T) over patches of dimension D = p * p * C. With `num_channels`
    None, C is read from the first batch (every batch carries it); given, each batch is checked against it."""

    def __init__(self, patch_size: int, num_channels: int | None = None, device: torch.device | str = "cpu"):
        self.patch_size, self.num_channels, self.device = patch_size, num_channels, device
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = self.outer = None
        if num_channels is not None:
            self._allocate(num_channels)

    def _allocate(self, num_channels: int):
        dim = self.patch_size * self.patch_size * num_channels
        self.num_channels = num_channels
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, images: torch.Tensor, num_patches_per_image: int | None = None,
               generator: torch.Generator | None = None):
        """Add a (batch, C, H, W) batch; optionally a random subset of `num_patches_per_image` patches per image."""
        if images.ndim != 4 or images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(
                f"fit_patch_pca: an image batch has shape {tuple(images.shape)}, expected (batch, C, H, W) with H and "
                f"W divisible by patch_size {self.patch_size}."
            )
        if self.num_channels is None:
            self._allocate(images.shape[1])
        if images.shape[1] != self.num_channels:
            raise ValueError(f"fit_patch_pca: an image batch has {images.shape[1]} channels, expected "
                             f"{self.num_channels} (from num_channels or the first batch): use one channel count.")
        patches = patchify(images.to(self.sum.device, torch.float64), self.patch_size)
        if num_patches_per_image is not None and num_patches_per_image < patches.shape[1]:
            scores = torch.rand(patches.shape[:2], generator=generator).to(patches.device)
            keep = scores.argsort(dim=1)[:, :num_patches_per_image]
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        patches = patches.reshape(-1, patches.shape[-1])
        self.count += patches.shape[0]
        self.sum += patches.sum(0)
        self.outer += patches.T @ patches

    def reduce(self, sum_across_processes: Callable[[torch.Tensor], torch.Tensor]):
        """Replace the sums by their totals over all processes, e.g. `lambda t: accelerator.reduce(t, "sum")`."""
        if self.sum is None:
            raise ValueError("fit_patch_pca: this process saw no images, so its channel count is unknown: pass "
                             "num_channels when a process may get no data.")
        self.count, self.sum, self.outer = (sum_across_processes(t) for t in (self.count, self.sum, self.outer))

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (D,), components (D, D) as rows, eigenvalues (D,) descending), float64, signs fixed so that each
        component's largest-magnitude entry is positive (reproducible fits)."""
        if self.count < 2:
            raise ValueError(f"fit_patch_pca: saw {int(self.count)} patches, need at least 2: is the data empty?")
        mean = self.sum / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, components = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1).T.contiguous()
        largest = components.gather(1, components.abs().argmax(1, keepdim=True))
        components = components * torch.where(largest < 0, -1.0, 1.0).to(components)
        return mean.cpu(), components.cpu(), eigenvalues.cpu()


def fit_patch_pca(
    images: Iterable[torch.Tensor],
    patch_size: int,
    num_channels: int | None = None,
    num_patches_per_image: int | None = None,
    max_patches: int | None = None,
    generator: torch.Generator | None = None,
    sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the patch-wise PCA over an iterable of (batch, C, H, W) float tensors in the model's pixel space.

    Args:
        num_channels: C of the images; read from the first batch if None.
        num_patches_per_image: random patches kept per image (all if None).
        max_patches: stop once this many patches (per process) were accumulated.
        sum_across_processes: adds a tensor over processes (e.g. `lambda t: accelerator.reduce(t, "sum")`), so each
            process feeds its own share of the images and all get the same, exact result.

    Returns `(mean, components, eigenvalues)` in float64: components as rows, eigenvalues descending; pass them to
    `model.set_pca(...)`.
    """
    accumulator = None
    for batch in images:
        if accumulator is None:
            accumulator = PatchPCAAccumulator(patch_size, num_channels, device=batch.device)
        accumulator.update(batch, num_patches_per_image, generator)
        if max_patches is not None and accumulator.count >= max_patches:
            break
    if accumulator is None:
        accumulator = PatchPCAAccumulator(patch_size, num_channels)
    if sum_across_processes is not None:
        accumulator.reduce(sum_across_processes)
    return accumulator.finalize()


def explained_variance_ratio(eigenvalues: torch.Tensor, pca_dim: int) -> float:
    """Share of the patch variance kept by the top `pca_dim` components."""
    return float(eigenvalues[:pca_dim].sum() / eigenvalues.sum())
