"""One forward pass for many modules of one structure: several subjects' denoisers in one batched call.

The modules share a structure (the same class, parameter names and shapes) and mostly the same tensors: each
subject's denoiser is a copy of one frozen base that shares its weights and adds its own LoRA (or, for a full
fine-tune, holds its own weights). `run_stacked` calls the first module's forward once, through
`torch.func.functional_call` under `torch.func.vmap` over the modules: a tensor every module holds (the frozen
base) enters once, unbatched; the others (adapters, own weights) are stacked along a new leading dimension, as are
the calls' tensor arguments. Each module's output slice depends on its own weights and inputs only, and autograd
carries each slice's gradient back through the stack to that module's own parameters.

`call_key` says which calls may run together: same structure, same non-tensor module state (train/eval,
adapters on or off, LoRA scales), same argument layout, non-tensor arguments and tensor shapes. Calls that differ
run apart.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

Call = tuple[tuple, dict]  # a forward's (args, kwargs)

_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (structure key, its adapter layers)


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What functional_call swaps: every parameter and buffer by name (a tied weight once)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _structure(module: torch.nn.Module) -> tuple[tuple, list[torch.nn.Module]]:
    """(class and tensor layout, the adapter layers whose switches change the forward); cached per module: the
    modules batched here are set up before their first batched call and keep their layout."""
    cached = _STRUCTURES.get(module)
    if cached is None:
        layout = tuple((name, tuple(t.shape), t.dtype, t.device, type(t)) for name, t in named_tensors(module).items())
        adapters = [m for m in module.modules() if hasattr(m, "_disable_adapters")]  # peft's tuner layers
        cached = _STRUCTURES[module] = ((type(module), layout), adapters)
    return cached


def _frozen(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_frozen(v) for v in value)
    return value


def state_key(module: torch.nn.Module) -> Hashable:
    """The module state outside its tensors that its forward reads: train/eval, gradient checkpointing, and per
    adapter layer whether adapters are off (RPO's reference), which are active, their scales, merges."""
    _, adapters = _structure(module)
    layers = tuple((bool(m._disable_adapters), _frozen(getattr(m, "_active_adapter", None)), _frozen(getattr(m, "scaling", None)),
                    _frozen(getattr(m, "merged_adapters", None))) for m in adapters)
    return module.training, bool(getattr(module, "is_gradient_checkpointing", False)), layers


def call_key(module: torch.nn.Module, args: tuple, kwargs: dict) -> Hashable | None:
    """Calls with equal keys can run as one stacked call; None: this call runs alone (an unhashable argument)."""
    leaves, spec = tree_flatten((args, kwargs))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, type(leaf)))
        else:
            described.append(("value", leaf))
    key = (_structure(module)[0], state_key(module), str(spec), tuple(described))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def run_stacked(modules: Sequence[torch.nn.Module], calls: Sequence[Call]) -> list[Any]:
    """Each module's forward on its own call, computed as one vmapped call of modules[0]'s forward. The calls must
    share a `call_key`. Tensors all modules share are passed once; the rest are stacked (a copy per call: LoRA
    weights are small; a full fine-tune's are the price of batching it)."""
    template = modules[0]
    tensors = [named_tensors(m) for m in modules]
    shared = {name: t for name, t in tensors[0].items() if all(other[name] is t for other in tensors[1:])}
    stacked = {name: torch.stack([own[name] for own in tensors]) for name in tensors[0] if name not in shared}
    flats = [tree_flatten(call)[0] for call in calls]
    spec = tree_flatten(calls[0])[1]
    positions = [i for i, leaf in enumerate(flats[0]) if isinstance(leaf, torch.Tensor)]
    inputs = [torch.stack([flat[i] for flat in flats]) for i in positions]
    out: dict[str, Any] = {}

    def one(params: dict[str, torch.Tensor], tensor_args: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = list(flats[0])
        for i, t in zip(positions, tensor_args):
            flat[i] = t
        args, kwargs = tree_unflatten(flat, spec)
        result = torch.func.functional_call(template, {**shared, **params}, args, kwargs)
        leaves, out["spec"] = tree_flatten(result)
        out["positions"] = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        out["leaves"] = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]  # no vmapped tensor escapes
        return [leaves[i] for i in out["positions"]]

    results = torch.func.vmap(one, randomness="error")(stacked, inputs)
    per_call = []
    for k in range(len(modules)):
        leaves = list(out["leaves"])
        for i, t in zip(out["positions"], results):
            leaves[i] = t[k]
        per_call.append(tree_unflatten(leaves, out["spec"]))
    return per_call
