"""Print the floor environment's requirements: every package setup.cfg declares (with the test extra's), the
Hugging Face stack pinned to its declared minimum (`name==minimum`, read from the declaration itself so that the
tested floors cannot drift from it), the rest as declared. With --check (run by the floor environment's python):
fail unless exactly those minimum versions are installed, and print them. torch and torchvision are not
among them (the floor environment reuses the installed ones: their floors are declared, not tested); numpy,
Pillow, matplotlib, pyyaml and the test tools are resolved by pip as for any user."""

import configparser
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

TESTED = ("transformers", "accelerate", "datasets", "timm", "diffusers", "evaluate", "safetensors", "huggingface-hub")

setup = configparser.ConfigParser()
setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
# The export extra (onnx, onnxruntime) is left out: no floor test exports, and it would only add install time.
lines = [setup["options"]["install_requires"],
         *(packages for extra, packages in setup["options.extras_require"].items() if extra != "export")]
floors, others = {}, []
for line in "\n".join(lines).splitlines():
    if line.strip() and not line.strip().startswith("ldae["):
        requirement = Requirement(line.strip())
        minimum = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if requirement.name in TESTED and minimum:
            floors[requirement.name] = minimum[0]
        elif requirement.name not in ("torch", "torchvision"):
            others.append(str(requirement))
missing = set(TESTED) - set(floors)
if missing:
    raise SystemExit(f"setup.cfg declares no minimum for {sorted(missing)}")
if "--check" not in sys.argv:
    print("\n".join([*(f"{name}=={minimum}" for name, minimum in floors.items()), *others]))
    raise SystemExit
wrong = [f"{name} {version(name)} (expected {minimum})" for name, minimum in floors.items()
         if Version(version(name)) != Version(minimum)]
if wrong:
    raise SystemExit(f"The floor environment has {', '.join(wrong)}.")
print("floor environment:", ", ".join(f"{name} {version(name)}" for name in [*floors, "torch", "torchvision"]))
