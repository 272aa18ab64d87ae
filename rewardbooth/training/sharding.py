"""Full fine-tuning past one card (train.fsdp): PyTorch's FSDP2 (`fully_shard`) over the processes of
--num-processes / accelerate launch.

Each process keeps 1/N of every trained weight (dim 0, padded), of its gradient and of AdamW's two moments; a block's
whole weights exist only while it computes (all-gathered before, freed after; its gradients reduce-scattered as soon
as they are made). The blocks are the classes a model lists in `_no_split_modules`, which diffusers and transformers
both give: the U-Net's resnet and transformer blocks (and up blocks around them), FLUX.1's / FLUX.2's / SD3's
transformer blocks, CLIP's encoder layers (a trained text encoder is sharded like the denoiser). RPO's frozen
reference copy is sharded the same way; what is small stays whole on every process (VAE, frozen text encoders, DPG's
critic, replicated by DDP as without sharding, and its judge). Under gradient accumulation the gradients are
reduce-scattered after every micro-batch: skipping that sync, as DDP does, would keep every block's whole gradients.
Everything that runs a sharded module runs on every process, since its all-gathers are collective: validation
sampling, and the gathering of the result, of budgets and of the best validated weights (the main process writes).

accelerate launches the processes and still does precision (autocast, as it wraps a prepared model), accumulation,
the LR schedule and the replicated modules. Its own FSDP plugin is not used: accelerate 1.15 turns FSDP on only for
GPU backends (a CPU / gloo run silently falls back to DDP, so nothing here could be tested without a GPU), prepares
one model per call (a U-Net and a trained text encoder are two), and checkpoints through torch.distributed.checkpoint,
whose metadata file is a pickle. Checkpoints here stay safetensors: each process writes its own shards of the trained
weights and of the optimizer state, with the layout (process count, global shapes) in the files' headers, and reads
them back only into a run with the same process count. The final weights are gathered once, on the main process,
into the usual unet/ or transformer/ folder (training/weights.py), which loads without rewardbooth.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rewardbooth.errors import CheckpointError, ConfigError
from rewardbooth.training.reachable import resident_modules

# torch.distributed is imported inside the functions that use it: importing this module stays cheap.

OPTIMIZER_SHARDS = "optimizer_shards"  # checkpoint file stem of the sharded optimizer's state


def check_processes(fsdp: bool, num_processes: int) -> None:
    """Refuse what cannot work, before anything loads: sharding over one process, accelerate's own FSDP config."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("accelerate's FSDP config (accelerate launch --use_fsdp) is not how rewardbooth shards: launch "
                          "with a plain multi-GPU config and pass --fsdp (train.fsdp=true)")
    if fsdp and num_processes < 2:
        raise ConfigError("train.fsdp shards over processes, and with one process it shards nothing: add --num-processes N "
                          "(N >= 2, e.g. the number of GPUs) or run under accelerate launch, or drop --fsdp")


def block_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one (the classes the model names in _no_split_modules), innermost first."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in module.modules() if m is not module and type(m).__name__ in names][::-1]


def sharded_modules(components, method, train_text_encoder: bool) -> list[torch.nn.Module]:
    """What train.fsdp shards: the trained denoiser, the trained text encoders, and frozen copies of the denoiser the
    method keeps (RPO's reference under full fine-tuning), found by their class, so a method needs no hook."""
    trained = trained_modules(components, train_text_encoder)
    denoiser = type(components.unet)
    copies = [m for m in resident_modules([method]) if type(m) is denoiser and m is not components.unet]
    return trained + copies


def trained_modules(components, train_text_encoder: bool) -> list[torch.nn.Module]:
    """What a run trains: the denoiser, then the text encoders it may train (FLUX's T5 stays frozen)."""
    return [components.unet] + (list(components.trainable_text_encoders) if train_text_encoder else [])


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _upcast_trained(module: torch.nn.Module) -> None:
    """Trained weights in float32 (as attach_trainable makes them without sharding), one block at a time: the whole
    model is never held in float32 before it is sharded."""
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32 and not isinstance(p, DTensor):
            p.data = p.data.float()


def shard_module(module: torch.nn.Module, mesh) -> None:
    """fully_shard per block, then the rest of the module; each block moves to the mesh's device as it is sharded."""
    from torch.distributed.fsdp import fully_shard

    for block in block_modules(module):
        _upcast_trained(block)
        fully_shard(block, mesh=mesh)
    _upcast_trained(module)
    fully_shard(module, mesh=mesh)


class Sharding:
    """One run's sharded modules and optimizer (the trainer makes one when train.fsdp is on)."""

    def __init__(self, accelerator):
        check_processes(True, accelerator.num_processes)
        self.accelerator = accelerator
        self.optimizer = None  # the sharded optimizer, wrapped by accelerate (checkpointed by Checkpoints)

    def shard(self, components, method, train_text_encoder: bool, groups: list[dict]) -> list[dict]:
        """Shard the trained modules and the method's frozen copies in place; the optimizer groups, on the shards."""
        from torch.distributed.device_mesh import init_device_mesh

        acc = self.accelerator
        trained = trained_modules(components, train_text_encoder)
        modules = sharded_modules(components, method, train_text_encoder)
        names = {id(p): (i, name) for i, m in enumerate(trained) for name, p in m.named_parameters()}
        device = acc.device
        if device.type != "cpu":  # off the device until sharded: each block goes back as its 1/N shard
            for module in modules:
                module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mesh = init_device_mesh(device.type, (acc.num_processes,))
        for module in modules:
            shard_module(module, mesh)
        params = [dict(m.named_parameters()) for m in trained]
        return [{**g, "params": [params[i][name] for i, name in (names[id(p)] for p in g["params"])]} for g in groups]

    def prepare(self, trained: list[torch.nn.Module], rest: list, optimizer, lr_scheduler) -> list:
        """What accelerate.prepare(*trained, *rest, optimizer, lr_scheduler) returns, with the sharded modules and their
        optimizer kept out of DDP: autocast on the modules as accelerate applies it, the optimizer wrapped so it steps
        on the micro-batch that syncs, the schedule registered so save_state / load_state keep it."""
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        acc = self.accelerator
        models = [acc.prepare_model(m, evaluation_mode=True) for m in trained]  # autocast, registered; no DDP, no move
        others = acc.prepare(*rest) if rest else ()
        others = list(others) if len(rest) > 1 else [others] if rest else []
        self.optimizer = AcceleratedOptimizer(optimizer, device_placement=False, scaler=acc.scaler)
        scheduler = AcceleratedScheduler(lr_scheduler, self.optimizer, step_with_optimizer=acc.step_scheduler_with_optimizer,
                                         split_batches=acc.split_batches)
        scheduler._is_accelerate_prepared = True  # prepare_scheduler then only registers it
        acc.prepare_scheduler(scheduler)
        return [*models, *others, self.optimizer, scheduler]


# --- the final weights --------------------------------------------------------------------------------------------


def original_class(module: torch.nn.Module) -> type:
    """The model class under FSDP's generated subclass (FSDPUNet2DConditionModel -> UNet2DConditionModel)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gathered(module: torch.nn.Module, main: bool) -> torch.nn.Module | None:
    """A plain copy of a sharded module with its whole weights, in CPU memory on the main process (None on the others),
    for save_pretrained. Every process must call it: the shards are gathered one tensor at a time."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    cls = original_class(module)
    with init_empty_weights():  # parameters on meta, replaced by the gathered tensors below
        plain = cls.from_config(module.config) if issubclass(cls, ModelMixin) else cls._from_config(module.config)
    plain.load_state_dict(state, assign=True, strict=True)
    return plain.eval()


# --- checkpoints: each process its own shards -----------------------------------------------------------------------


def shard_file(folder: Path, stem: str, rank: int) -> Path:
    return Path(folder) / f"{stem}.rank{rank}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _layout(processes: int, rank: int, **more: str) -> dict[str, str]:
    return {"processes": str(processes), "rank": str(rank), **more}


def _check_layout(path: Path, metadata: dict | None, processes: int) -> None:
    written = int((metadata or {}).get("processes", 0))
    if written != processes:
        raise CheckpointError(f"checkpoint {path.parent} was written by {written} sharded processes and this run has {processes}: "
                              f"resume with --num-processes {written}")


def missing_shard(folder: Path, stem: str, processes: int, rank: int) -> None:
    """A shard this process should read is absent: another process count wrote the checkpoint (or it is damaged)."""
    written = len(list(Path(folder).glob(f"{stem}.rank*.safetensors")))
    if written and written != processes:
        raise CheckpointError(f"checkpoint {folder} was written by {written} sharded processes and this run has {processes}: "
                              f"resume with --num-processes {written}")
    raise FileNotFoundError(f"{shard_file(folder, stem, rank).name} is missing")


def save_shards(module: torch.nn.Module, folder: Path, stem: str, processes: int, rank: int) -> None:
    """This process's shard of every trained weight, with each weight's whole shape in the header."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    tensors = {n: _local(p).detach().contiguous() for n, p in params.items()}
    shapes = json.dumps({n: list(p.shape) for n, p in params.items()})
    save_file(tensors, str(shard_file(folder, stem, rank)), metadata=_layout(processes, rank, shapes=shapes))


def load_shards(module: torch.nn.Module, folder: Path, stem: str, processes: int, rank: int) -> None:
    path = shard_file(folder, stem, rank)
    if not path.is_file():
        missing_shard(folder, stem, processes, rank)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with safe_open(str(path), "pt") as f:  # read into CPU memory, one tensor at a time
        _check_layout(path, f.metadata(), processes)
        shapes = json.loads(f.metadata()["shapes"])
        if set(f.keys()) != set(params) or any(shapes[n] != list(p.shape) for n, p in params.items()):
            raise RuntimeError(f"checkpoint {folder} does not match this run's trainable parameters")
        with torch.no_grad():
            for name, p in params.items():
                local, saved = _local(p), f.get_tensor(name)
                if saved.shape != local.shape:
                    raise RuntimeError(f"{path.name}: {name} has shape {tuple(saved.shape)}, this process's shard {tuple(local.shape)}")
                local.copy_(saved)


def save_optimizer_shards(optimizer, folder: Path, processes: int, rank: int) -> None:
    """This process's part of the optimizer state (AdamW's moments of its shards; the step counts), and the
    param groups' settings as JSON: a safetensors file, no pickle."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": _local(value).detach().contiguous()
               for index, values in state["state"].items() for key, value in values.items() if torch.is_tensor(value)}
    save_file(tensors, str(shard_file(folder, OPTIMIZER_SHARDS, rank)),
              metadata=_layout(processes, rank, param_groups=json.dumps(state["param_groups"])))


def load_optimizer_shards(optimizer, folder: Path, processes: int, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    path = shard_file(folder, OPTIMIZER_SHARDS, rank)
    if not path.is_file():
        missing_shard(folder, OPTIMIZER_SHARDS, processes, rank)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        _check_layout(path, f.metadata(), processes)
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            index, name = key.split(".", 1)
            p, value = params[int(index)], f.get_tensor(key)
            if isinstance(p, DTensor) and name != "step":  # a moment of this process's shard
                value = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())
            state.setdefault(int(index), {})[name] = value
    if sum(len(g["params"]) for g in groups) != len(params):
        raise RuntimeError(f"checkpoint {folder} does not match this run's optimizer")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- memory: what one of N processes holds ----------------------------------------------------------------------------


def shard_elements(t: torch.Tensor, processes: int) -> int:
    """Elements of the largest of N dim-0 shards (FSDP2 pads every shard to it)."""
    if t.dim() == 0:
        return t.numel()
    rows = t.shape[0]
    return math.ceil(rows / processes) * (t.numel() // rows if rows else 0)


def gathered_units(module: torch.nn.Module) -> tuple[int, int]:
    """(root, largest block): bytes of a sharded module's own whole weights outside any block (the root unit, kept
    gathered from forward to backward) and of its largest block's own (trained weights in float32)."""
    def size(params) -> int:
        return sum(p.numel() * (4 if p.requires_grad else p.element_size()) for p in params)

    units, claimed = [], set()
    for block in block_modules(module):  # innermost first: a block's own weights exclude its inner blocks'
        own = [p for p in block.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        units.append(size(own))
    return size(p for p in module.parameters() if id(p) not in claimed), max(units, default=0)


def gathered_bytes(modules: list[torch.nn.Module]) -> int:
    """Whole weights one process holds at once while sharded modules compute: every root unit, two blocks (the one
    computing and the next, prefetched) and one block's gradients before they are reduce-scattered."""
    units = [gathered_units(m) for m in modules]
    return sum(root for root, _ in units) + 3 * max((block for _, block in units), default=0)
