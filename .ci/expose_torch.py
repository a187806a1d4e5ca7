"""Expose this environment's torch and torchvision, with their own dependencies and nothing else, to another
environment: symlinks to their installed files in TARGET, which that environment adds to sys.path with a .pth file.

The floor environment of .ci/run uses it so that it tests the declared minimum versions of the Hugging Face stack
without downloading and unpacking torch again (several GB with its CUDA libraries) and without seeing any other
package of this environment. TARGET must lie outside the other environment's prefix: pip then never uninstalls
what the links point to ("outside environment").
Usage: python expose_torch.py TARGET
"""

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement


def closure(names):
    """The distributions named and, recursively, those they require here (markers and extras evaluated)."""
    seen, pending = {}, [(name, "") for name in names]
    while pending:
        name, extra = pending.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # an optional requirement this environment goes without: so does the other
            continue
        key = (dist.metadata["Name"].lower().replace("_", "-"), extra)
        if key in seen:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                pending += [(requirement.name, wanted) for wanted in ["", *requirement.extras]]
    return {id(dist): dist for dist in seen.values()}.values()


def main(target: Path):
    target.mkdir(parents=True, exist_ok=True)
    for dist in closure(["torch", "torchvision"]):
        site = Path(dist.locate_file(""))
        # Top-level entries of the distribution (packages, modules, its .dist-info); scripts in bin/ are not needed.
        for top in {Path(file).parts[0] for file in dist.files or [] if not str(file).startswith("..")}:
            link = target / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
