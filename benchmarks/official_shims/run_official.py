"""Run a research script with fake_torchvision standing in for torchvision (see its docstring).

    python run_official.py [--one-device] SCRIPT [ARGS...]

diffusers, transformers and torchmetrics look for torchvision when first imported; importing them
first, while it is absent, keeps them on their PIL paths. Then the stand-in is registered and the script runs.

--one-device: torch.cuda.device_count() answers at least 1. RPO's dataset takes a modulus by the
GPU count (datasets_utils.py), so as released it cannot run on a machine without one; everything
else still sees no CUDA (is_available() is unchanged) and runs on the CPU."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import diffusers  # noqa: E402,F401
import diffusers.loaders.peft  # noqa: E402,F401
import diffusers.models.autoencoders.autoencoder_kl  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import CLIPTextModel  # noqa: E402,F401

try:  # RPO's metrics; it too probes torchvision on import
    import torchmetrics.functional.multimodal  # noqa: E402,F401
except ImportError:
    pass

import fake_torchvision  # noqa: E402
import fake_torchvision.transforms  # noqa: E402

sys.modules["torchvision"] = fake_torchvision
sys.modules["torchvision.transforms"] = fake_torchvision.transforms
if sys.argv[1] == "--one-device":
    import torch

    real_count = torch.cuda.device_count
    torch.cuda.device_count = lambda: max(1, real_count())
    del sys.argv[1]
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
