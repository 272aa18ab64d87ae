"""What a method supplies to the one training loop.

A method is the paper's algorithm box: what data it needs (prepared once, before adapters are
attached, so the frozen base model can generate class images or negatives) and the loss of one
micro-batch. The loop owns everything else: optimizers (a method's own ones step through
`TrainContext.owned_backward`, once per optimizer step), precision, accumulation, checkpoints,
logging, validation and model selection.

Everything the rest of rewardbooth knows about a method is a class attribute here: its help
line, its config section, its paper defaults and checks, its MiniBench settings and named
variants, the curves the web app draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:
    from rewardbooth.config import RunConfig
    from rewardbooth.methods.context import TrainContext


class Method:
    name: str = ""
    summary: str = ""  # one line for --help and the web app
    section: str | None = None  # its own config section (cfg.<section>), shown only in its runs' reports
    # A key of validation_metrics to maximise: the loop then keeps the best validated weights as
    # the run's result and can stop early (validation.patience). Without one, validation.select
    # gives any method selection by the loop's lambda-Harmonic reward.
    selection_metric: str | None = None
    # Settings of the paper's reference run, applied where the user's config leaves them unset.
    defaults: dict[str, Any] = {}
    # MiniBench: the settings this method trains with in `bench --suite mini` (tuned on sets 100+),
    # and named variants (name -> settings changed), benchmarked like methods.
    minibench: dict[str, Any] = {}
    # `bench --suite mini-lora`: on top of minibench and the suite's LoRA (mini/bench.py MINI_LORA), this method's
    # own LoRA settings (its learning rate, once tuned on sets 100+).
    minibench_lora: dict[str, Any] = {}
    # Per base model of MiniBench other than mini, on top of minibench (under the LoRA suite's): {"mini-flow": {...}}, e.g.
    # the rates tuned on mini-flow's transformer. Each method sets its own (a subclass would inherit its parent's rates).
    minibench_models: dict[str, dict[str, Any]] = {}
    variants: dict[str, dict[str, Any]] = {}
    # A variant's own settings per MiniBench model, on top of the method's minibench_models (under the LoRA suite's),
    # where its bracket chose apart from its method: {"dreambooth-select": {"mini-flow": {...}}}.
    variant_minibench_models: dict[str, dict[str, dict[str, Any]]] = {}
    # A variant's own LoRA settings, on top of the method's minibench_lora, where the LoRA bracket chose apart from its
    # method: {"dreambooth-select": {"train.learning_rate": ...}}.
    variant_minibench_lora: dict[str, dict[str, Any]] = {}
    curves: tuple[str, ...] = ("loss",)  # metrics.jsonl keys the web app plots
    run_files: tuple[str, ...] = ()  # what the method writes into the run folder (--overwrite may remove them)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Reject settings of this method that cannot work (ConfigError naming the setting)."""

    def prepare(self, ctx: TrainContext) -> None:
        """Load data, cache embeddings and base-model samples; runs with the base model frozen."""

    def extra_modules(self) -> list[torch.nn.Module]:
        """Trained modules besides the U-Net / text encoder (e.g. a critic); checkpointed too."""
        return []

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of the extra modules; stepped through ctx.owned_backward, checkpointed too."""
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Other state to save with checkpoints, as named tensors (written as safetensors: no pickle)."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_tensors() returned."""

    def use_prepared(self, modules: list[torch.nn.Module], optimizers: list) -> None:
        """Receive extra modules/optimizers as wrapped by accelerate (DDP, device placement)."""

    def loss(self, ctx: TrainContext, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch and detached scalars to log. `generator` seeds all randomness."""
        raise NotImplementedError

    def unet_batch(self, ctx: TrainContext) -> int:
        """Samples per micro-batch that go through the trained U-Net with gradients."""
        return ctx.cfg.train.batch_size

    def memory_probes(self, ctx: TrainContext) -> list:
        """The step's forward passes with gradients, for the memory estimate (run on fake tensors)."""
        n = self.unet_batch(ctx)
        probes = [ctx.family.probe(ctx.unet, n, ctx.latent_size, ctx.weight_dtype, ctx.device)]
        if ctx.trains_text_encoder:
            probes.append(lambda: ctx.encode_prompts([ctx.cfg.instance_prompt] * n))
        return probes

    def validation_prompts(self, ctx: TrainContext) -> list[str]:
        """Prompts sampled at each validation (formatted with the identifier and class noun)."""
        return [ctx.cfg.format_prompt(p) for p in ctx.cfg.validation.prompts]

    def validation_metrics(self, ctx: TrainContext, step: int, prompts: list[str], images: list[list]) -> dict[str, float]:
        """Extra numbers computed on the validation images (e.g. a reward)."""
        return {}
