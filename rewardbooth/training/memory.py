"""Peak training memory, estimated before the first step.

    peak = weights      every parameter and buffer the run keeps on the device, in its dtype (a
                        quantized base's weight: its int8 data and scales; not the encoders
                        kept in CPU memory)
         + gradients    one per trained parameter (float32: trained weights stay float32)
         + optimizer    AdamW 8 bytes per trained parameter, 8-bit AdamW 2 (tensors under 4096
                        elements stay 32-bit, as bitsandbytes keeps them), Prodigy 16
         + EMA          a float32 copy of the trained parameters (train.ema_decay)
         + gathered     train.fsdp: whole weights held while a sharded block computes (training/sharding.py)
         + activations  what autograd saves for the backward of one micro-batch
         + workspace    twice the largest saved tensor (its gradient and a temporary in the backward)

Activations are not guessed from layer counts: the step's forward passes (the U-Net at the
method's batch, and DPG's decode and reward encoder where it backpropagates through them) run
once on fake tensors, which carry shapes and dtypes but no storage, while a saved-tensor hook
adds up what autograd keeps. Precision, gradient checkpointing, LoRA and the attention kernel
are thereby counted as they will run, in well under a second and with no memory.

With N processes each holds its own copy of everything, except under train.fsdp: there the sharded modules'
weights, their gradients and the optimizer state are 1/N per process (the largest dim-0 shard, as FSDP2 pads
them), and the whole weights of the blocks being computed are added (`gathered`). The figures are per process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rewardbooth.training import sharding
from rewardbooth.training.reachable import resident_modules

GIB = 1024**3
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
OPTIMIZER_BYTES = {"adamw": 8, "prodigy": 16}  # per trained element: AdamW's two moments; Prodigy adds s and p0


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    workspace: int
    gathered: int = 0  # train.fsdp: whole weights of the blocks being computed

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.gathered + self.activations + self.workspace

    def line(self, device: torch.device | str | None = None, capacity: int | None = None) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in
                          ("weights", "gradients", "optimizer", "ema", "gathered", "activations", "workspace") if getattr(self, name))
        where = f" of {capacity / GIB:.1f} GiB on {device}" if capacity else ""
        return f"estimated peak memory {self.total / GIB:.2f} GiB ({parts}){where}"

    def exceeds(self, capacity: int | None) -> bool:
        return capacity is not None and self.total > capacity


def optimizer_bytes(parameters: Iterable[torch.Tensor], optimizer: str) -> int:
    if optimizer == "adamw8bit":
        return sum(p.numel() * (2 if p.numel() >= BNB_MIN_8BIT_SIZE else 8) for p in parameters)
    return sum(p.numel() for p in parameters) * OPTIMIZER_BYTES[optimizer]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _storages(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data: a quantized weight (a tensor subclass such as torchao's
    Int8Tensor) is its int8 data and scales, whose bytes its wrapper's dense-sized storage misstates."""
    if _plain(t) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    return [inner for name in t.__tensor_flatten__()[0] for inner in _storages(getattr(t, name))]


def _offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate's cpu_offload keeps this module's parameters in CPU memory (the flow models'
    T5 / Qwen3 on a GPU), leaving meta placeholders that are streamed to the device per call."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


def _device_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for sub in m.modules()
            for t in (*([] if _offloaded(sub) else sub.parameters(recurse=False)), *sub.buffers(recurse=False))]


def weight_bytes(modules: Iterable[torch.nn.Module], device: torch.device | None = None) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (on `device`;
    CPU-offloaded parameters are not)."""
    sizes = {}
    for t in _device_tensors(modules):
        if device is None or t.device.type in (torch.device(device).type, "meta"):  # meta: the memory table's models
            sizes.update((_storage_key(s), s.untyped_storage().nbytes()) for s in _storages(t))
    return sum(sizes.values())


class _Probes(torch.nn.Module):
    """Holds the modules so functional_call can swap all their weights for fake ones at once."""
    def __init__(self, modules: list[torch.nn.Module], probes: list[Callable[[], object]]):
        super().__init__()
        self.held = torch.nn.ModuleList(modules)
        self.probes = probes

    def forward(self) -> None:
        for probe in self.probes:
            probe()


def _fake_cpu_like(t: torch.Tensor) -> torch.Tensor:
    """A CPU stand-in for a meta tensor (models built on the meta device for the memory table),
    created inside a FakeTensorMode: CPU kernels decide what is saved, nothing is allocated."""
    fake = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    return fake.requires_grad_(t.requires_grad) if t.is_floating_point() else fake


def _fake_like(t: torch.Tensor, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """A fake stand-in for a tensor subclass (a quantized base's int8 weight), made without referring
    to it: the fake mode's memo would keep a weak reference to the real weight, and module.to() must
    swap such weights later, which torch refuses while a weak reference lives."""
    fake = torch.empty(t.shape, dtype=dtype or t.dtype, device=device or t.device)
    return fake.requires_grad_(t.requires_grad) if fake.is_floating_point() else fake


def _trained_below_float32(t: torch.Tensor) -> bool:
    """A trained weight still in half precision: the step runs it in float32 (autocast then saves its cast)."""
    return t.requires_grad and t.is_floating_point() and t.dtype != torch.float32


def saved_activation_bytes(probes: list[Callable[[], object]], modules: Iterable[torch.nn.Module]) -> tuple[int, int]:
    """(total, largest) bytes autograd saves while the probes run on fake tensors; the modules'
    own weights are not counted (they are resident anyway). Each probe is one forward pass
    whose activations live until the step's backward, so their savings add up. Storages are told apart by
    address, so each is held until counted: one that autograd frees early (a probe's graph once the probe
    returns, a branch whose output the model drops, as Qwen-Image's last text stream) could otherwise leave
    its address to a later one, which then replaced it in the count, as the allocator happened to reuse it."""

    holder = _Probes(list(modules), probes)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        saved.setdefault(_storage_key(t), t)
        return t

    real = {**dict(holder.named_parameters(remove_duplicate=False)), **dict(holder.named_buffers(remove_duplicate=False))}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        by_id: dict[int, torch.Tensor] = {}  # a tied weight stays one tensor
        for t in real.values():
            if id(t) not in by_id:
                if _trained_below_float32(t):  # train.fsdp makes it float32 as it shards it, before the step
                    by_id[id(t)] = _fake_like(t, torch.float32, "cpu" if t.device.type == "meta" else t.device)
                else:
                    by_id[id(t)] = _fake_cpu_like(t) if t.device.type == "meta" else mode.from_tensor(t) if _plain(t) else _fake_like(t)
        fake = {name: by_id[id(t)] for name, t in real.items()}
        weights = {_storage_key(t) for t in fake.values()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.func.functional_call(holder, fake, (), strict=False)
    activations = [t.untyped_storage().nbytes() for key, t in saved.items() if key not in weights]
    return sum(activations), max(activations, default=0)


def autocast_for(device, mixed_precision: str):
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def sharded_weight_bytes(module: torch.nn.Module, processes: int) -> int:
    """One process's share of a module sharded by train.fsdp: its shard of each weight (trained ones in float32,
    which the trainer makes them block by block as it shards), and its buffers whole."""
    shards = sum(sharding.shard_elements(p, processes) * (4 if p.requires_grad else p.element_size()) for p in module.parameters())
    return shards + sum(b.numel() * b.element_size() for b in module.buffers())


def estimate(*, resident: list[torch.nn.Module], trained: list[torch.Tensor], probes: list[Callable[[], object]],
             optimizer: str = "adamw", ema: bool = False, mixed_precision: str = "no", device=None,
             processes: int = 1, sharded: Iterable[torch.nn.Module] = ()) -> MemoryEstimate:
    """The formula above for a set-up given as modules, trained tensors and forward probes; per process of
    `processes`, with the `sharded` modules (train.fsdp) split over them."""
    sharded = list(sharded)
    in_shards = {id(p) for m in sharded for p in m.parameters()}
    replicated = [p for p in trained if id(p) not in in_shards]
    shard_elements = sum(sharding.shard_elements(p, processes) for p in trained if id(p) in in_shards)
    gradients = sum(p.numel() for p in replicated) * 4
    if processes > 1:  # DDP keeps its gradient buckets beside the gradients
        gradients *= 2
    gradients += shard_elements * 4
    with autocast_for(device or "cpu", mixed_precision):
        activations, largest = saved_activation_bytes(probes, resident)
    whole = [m for m in resident if not any(m is s for s in sharded)]
    return MemoryEstimate(
        weights=weight_bytes(whole, device) + sum(sharded_weight_bytes(m, processes) for m in resident if any(m is s for s in sharded)),
        gradients=gradients,
        optimizer=optimizer_bytes(replicated, optimizer) + shard_elements * OPTIMIZER_BYTES.get(optimizer, 8),
        ema=sum(p.numel() for p in trained) * 4 if ema else 0,
        activations=activations,
        workspace=2 * largest,
        gathered=sharding.gathered_bytes(sharded),
    )


def device_capacity(device: torch.device | str) -> int | None:
    """Bytes of memory the device has: the GPU's, or the machine's RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().total
    return None


def take_device_peak(device: torch.device | str) -> float | None:
    """GiB of accelerator memory at its peak since the last call (then reset), for metrics.jsonl:
    the training steps' real peak beside the estimate. None on the CPU (no resettable peak there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


MEMORY_ADVICE = ("train.mixed_precision=bf16 (or fp16), train.gradient_checkpointing=true, adapter.kind=lora, "
                 "model.quantize=int8 (LoRA on an int8 base: about half a FLUX / SD3.5 transformer's weights), "
                 "train.optimizer=adamw8bit or a smaller train.batch_size")


def for_subjects(single: MemoryEstimate, subjects: int, own_weights: int, stacked: int = 0) -> MemoryEstimate:
    """train-many: `subjects` subjects like `single` over one shared base. The weights once, plus each further
    subject's own (`own_weights`: its adapter or its own copy, its critic); gradients, optimizer state, EMA and
    activations once per subject; the workspace of the stacked call (its largest saved tensor is `subjects` times
    one subject's); `stacked`: the trained tensors the stacked call copies per subject and keeps for the backward."""
    k = subjects
    return replace(single, weights=single.weights + (k - 1) * own_weights, gradients=k * single.gradients,
                               optimizer=k * single.optimizer, ema=k * single.ema, activations=k * (single.activations + stacked),
                               workspace=k * single.workspace)
