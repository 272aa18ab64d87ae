"""Run a research script with fake_torchvision standing in for torchvision (see its docstring).

    python run_official.py SCRIPT [ARGS...]

diffusers and transformers look for torchvision when first imported; importing them first, while
it is absent, keeps them on their PIL paths. Then the stand-in is registered and the script runs."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import diffusers  # noqa: E402,F401
import diffusers.loaders.peft  # noqa: E402,F401
import diffusers.models.autoencoders.autoencoder_kl  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import CLIPTextModel  # noqa: E402,F401

import fake_torchvision  # noqa: E402
import fake_torchvision.transforms  # noqa: E402

sys.modules["torchvision"] = fake_torchvision
sys.modules["torchvision.transforms"] = fake_torchvision.transforms
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
