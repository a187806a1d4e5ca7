"""Patch PCA fit: the package's exact streaming fit (`fit_patch_pca`) against scikit-learn's `PCA` (full SVD of the
whole patch matrix in memory) and `IncrementalPCA` (streaming, approximate), on the same CIFAR-10 patches, in this
process. Prints wall time, the ratio to `fit_patch_pca`, and how far each result is from the exact one.

    python benchmarks/bench_pca.py                       # 10k images: 32 px / patch 8 (D = 192), 64 px / patch 16 (D = 768)
    python benchmarks/bench_pca.py --num_images 50000

Needs scikit-learn (the `test` extra). The 64 px case upsamples CIFAR-10 (bicubic) to get the paper's D = 768.
"subspace sin" is the largest principal-angle sine between the top D / 24 components and the exact ones; "eigenvalue
err" the largest eigenvalue difference relative to the top one (scikit-learn divides by n - 1, the exact fit by n, so
1 / n is the floor: 6e-6 for 160k patches).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_ldae import fit_patch_pca  # noqa: E402
from modeling_ldae.data import decode_image, find_image_column, load_image_dataset  # noqa: E402
from modeling_ldae.modeling_ldae import patchify  # noqa: E402

DEFAULT_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def subspace_error(components: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Largest principal-angle sine between the top-k subspaces (0: identical), immune to sign and to rotations
    inside groups of equal eigenvalues."""
    overlap = np.linalg.svd(components[:k] @ exact[:k].T, compute_uv=False)
    return float(np.sqrt(max(0.0, 1 - overlap.min() ** 2)))


def main(argv=None):
    from sklearn.decomposition import PCA, IncrementalPCA

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10_dir", type=Path, default=Path(os.environ.get("LDAE_CIFAR10_DIR", DEFAULT_CIFAR10)))
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--pca_dim", type=int, default=None, help="k of the subspace check (default: D / 24, as 32 / 768)")
    args = parser.parse_args(argv)

    dataset = load_image_dataset(dataset_name=str(args.cifar10_dir), split=f"train[:{args.num_images}]")
    pixels = np.stack([np.asarray(decode_image(image)) for image in dataset[find_image_column(dataset)]])
    images32 = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.num_images} CIFAR-10 training images")
    print(f"{'case':>18} {'method':>16} {'seconds':>8} {'ratio':>6} {'subspace sin':>12} {'eigenvalue err':>14}")
    for size, patch_size in ((32, 8), (64, 16)):
        images = images32 if size == 32 else torch.nn.functional.interpolate(images32, size=size, mode="bicubic")
        batches = images.split(args.batch_size)
        seconds, (mean, components, eigenvalues) = timed(lambda: fit_patch_pca(batches, patch_size))
        exact_components, exact_eigenvalues = components.numpy(), eigenvalues.numpy()
        k = args.pca_dim or components.shape[0] // 24
        case = f"{size}px/p{patch_size} D={components.shape[0]}"
        print(f"{case:>18} {'fit_patch_pca':>16} {seconds:8.2f} {1:6.2f} {0:12.1e} {0:14.1e}")
        patches = torch.cat([patchify(batch, patch_size).flatten(0, 1) for batch in batches]).double().numpy()
        incremental = IncrementalPCA(batch_size=args.batch_size * (size // patch_size) ** 2)
        for method, fit in (("sklearn PCA", lambda: PCA(svd_solver="full").fit(patches)),
                            ("IncrementalPCA", lambda: incremental.fit(patches))):
            other_seconds, fitted = timed(fit)
            error = np.abs(fitted.explained_variance_ - exact_eigenvalues).max() / exact_eigenvalues[0]
            print(f"{case:>18} {method:>16} {other_seconds:8.2f} {other_seconds / seconds:6.2f} "
                  f"{subspace_error(fitted.components_, exact_components, k):12.1e} {error:14.1e}")


if __name__ == "__main__":
    main()
