"""Run a research script with fake_torchvision standing in for torchvision (see its docstring).

    python run_official.py [--one-device] [--no-anomaly-detection] SCRIPT [ARGS...]

diffusers, transformers and torchmetrics look for torchvision when first imported; importing them
first, while it is absent, keeps them on their PIL paths. Then the stand-in is registered and the script runs.

--one-device: torch.cuda.device_count() answers at least 1. RPO's dataset takes a modulus by the
GPU count (datasets_utils.py), so as released it cannot run on a machine without one; everything
else still sees no CUDA (is_available() is unchanged) and runs on the CPU.

--no-anomaly-detection: torch.autograd.set_detect_anomaly does nothing. DPG's script turns it on,
so as released it stops at its first NaN gradient (step 1-5 on tiny); with it off the run goes on
to the end (NaN and all), which gives its whole-run time, and anomaly detection's own cost is
gone, so that time is, if anything, shorter than the released script's."""

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
import fake_torchvision.functional  # noqa: E402
import fake_torchvision.transforms  # noqa: E402

sys.modules["torchvision"] = fake_torchvision
sys.modules["torchvision.transforms"] = fake_torchvision.transforms
sys.modules["torchvision.transforms.functional"] = fake_torchvision.functional
import torch  # noqa: E402

while sys.argv[1].startswith("--"):
    option = sys.argv.pop(1)
    if option == "--one-device":
        real_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: max(1, real_count())
    elif option == "--no-anomaly-detection":
        torch.autograd.set_detect_anomaly = lambda *args, **kwargs: None
    else:
        raise SystemExit(f"run_official.py: unknown option {option}")
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
