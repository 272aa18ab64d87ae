"""What tests/test_training_fsdp.py runs in each of its `accelerate launch` processes (not a test module).

    fsdp_child.py PLAN.json     the plan's items in order, in every process, each process logging per item its
                                return code and seconds into LOG/rank{r}.jsonl (PLAN: {"log": LOG, "items": [...]}):

    {"name": N, "train": ARGS}                   `rewardbooth train ARGS` (cli.main, as each launched process runs it)
    {"name": N, "measure": [OUT, RUN, OVERRIDES]}  one sharded step of the run OVERRIDES (a dict), with the memory
                                                 estimate and what the step really held, per process, into OUT/rank{r}.json
    {"name": N, "kill": [CALL, ARGS]}            `rewardbooth train ARGS`, every process SIGKILLed at its CALL-th loss()
                                                 (a killed job: nothing is cleaned up); the plan's last item

One launch runs them all: each process pays its imports and its process group once. The runs stay apart as separate
launches keep them: every Trainer makes its own Accelerator (clearing accelerate's per-process state), seeds the
global generators and loads the model afresh; only the process group outlives a run (run_plan). The killed run, the
last item, trains to its kill exactly as the first item trained: the resume test compares them bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch


def kill(call: int, argv: list[str]) -> int:
    from rewardbooth.cli import main
    from rewardbooth.methods import get_method
    from rewardbooth.training import loop

    def killing(name):
        cls = get_method(name)

        class Killed(cls):
            calls = 0

            def loss(self, ctx, generator):
                type(self).calls += 1
                if self.calls == call:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().loss(ctx, generator)

        return Killed

    loop.get_method = killing
    return main(argv)


def storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(out: Path, run_dir: Path, overrides: dict) -> int:
    from accelerate import PartialState

    from rewardbooth.methods import load_config
    from rewardbooth.training import memory, sharding
    from rewardbooth.training.loop import Trainer, step_generator
    from rewardbooth.training.run_dir import prepare_run_dir

    state = PartialState(cpu=True)
    if state.is_main_process:
        prepare_run_dir(run_dir, resume=False, overwrite=False)
    state.wait_for_everyone()
    trainer = Trainer(load_config(overrides=overrides), run_dir, progress=False)
    ctx, trained, optimizer, _ = trainer._setup()
    acc, method = trainer.accelerator, trainer.method
    resident = memory.resident_modules([ctx.components, method])
    sharded = [m for m in resident if sharding.is_sharded(m)]
    whole = [m for m in resident if not sharding.is_sharded(m)]
    weights = memory.weight_bytes(whole, acc.device) + storage_bytes(p for m in sharded for p in m.parameters()) \
        + sum(b.numel() * b.element_size() for m in sharded for b in m.buffers())

    # One micro-batch: what autograd saves (no weight: neither a resident tensor nor a gathered parameter), the gradients.
    # Storages are told apart by address, so each is held until counted (as memory.saved_activation_bytes does): one
    # that autograd frees during the forward could otherwise leave its address to a later one, which replaced it.
    resident_storages = {t.untyped_storage()._cdata for t in memory._tensors(resident)}
    saved: dict[int, torch.Tensor] = {}

    most_gathered = [0]

    def gathered_storages() -> set[int]:  # the whole weights of the blocks computing now (FSDP swaps them in as plain tensors)
        storages = {p.untyped_storage()._cdata: p.untyped_storage().nbytes()
                    for m in sharded for p in m.parameters() if not hasattr(p, "to_local")}
        most_gathered[0] = max(most_gathered[0], sum(storages.values()))
        return set(storages)

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in resident_storages and key not in gathered_storages():
            saved.setdefault(key, t)
        return t

    with acc.accumulate(*trained):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = method.loss(ctx, step_generator(ctx.cfg.train.seed, 0, 0, acc.process_index))
        acc.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gradients = storage_bytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    e = trainer.memory_estimate
    record = {"rank": acc.process_index, "estimate": {k: getattr(e, k) for k in ("weights", "gradients", "optimizer", "activations", "gathered")},
              "measured": {"weights": weights, "gradients": gradients, "optimizer": storage_bytes(state_tensors),
                           "activations": sum(t.untyped_storage().nbytes() for t in saved.values()), "gathered_in_forward": most_gathered[0]},
              "sharded": [sharding.original_class(m).__name__ for m in sharded],
              "sharded_trainable": sum(p.requires_grad for m in sharded for p in m.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    return 0


def run_plan(plan: dict) -> int:
    """Every item in order; after each, all processes wait for each other and log it (a failed item does not stop the
    plan: the test asserts each item's return code). A run ends with accelerate's end_training(), which destroys the
    process group: that waits for the plan's end, so every item runs in the one group the launch made."""
    import time

    from accelerate import PartialState

    from rewardbooth.cli import main

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    state = PartialState(cpu=True)
    log = Path(plan["log"]) / f"rank{state.process_index}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    items = plan["items"]
    assert all("kill" not in item for item in items[:-1]), "a kill ends the launch: it must be the last item"
    for item in items:
        start = time.perf_counter()
        if "train" in item:
            rc = main(item["train"])
        elif "measure" in item:
            out, run, overrides = item["measure"]
            rc = measure(Path(out), Path(run), overrides)
        else:
            call, argv = item["kill"]
            rc = kill(call, argv)
        state.wait_for_everyone()
        with log.open("a") as f:
            f.write(json.dumps({"name": item["name"], "rc": rc, "seconds": round(time.perf_counter() - start, 2)}) + "\n")
    destroy(state)
    return 0


if __name__ == "__main__":
    sys.exit(run_plan(json.loads(Path(sys.argv[1]).read_text())))
