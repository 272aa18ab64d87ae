"""SDXL (tiny-sdxl preset) for every method, and LoRA files that other tools load (kohya layout; FLUX.1's on tiny-flux)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.models.export import KOHYA_WEIGHTS_NAME, lora_modules, sgm_module_name, to_kohya
from rewardbooth.models.loading import load_components, make_pipeline, resolve_model_path
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.finished_run import export_lora, load_run_pipeline
from rewardbooth.training.loop import train

STEPS = 3


def _overrides(subject_dir: Path, model: str, method: str, kind: str, alpha: float | None = None) -> dict:
    return {
        "model.name": model, "data.instance_dir": str(subject_dir), "data.class_noun": "toy", "train.method": method,
        "train.steps": STEPS, "train.learning_rate": 5e-2 if kind == "lora" else 1e-3, "train.log_every": 1,
        "train.checkpoint_every": 0, "adapter.kind": kind, "adapter.rank": 4, "adapter.alpha": alpha,
        "adapter.train_text_encoder": True, "prior.num_class_images": 2, "prior.generation_steps": 2,
        "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2, "rpo.prompts": ["a {identifier} {class_noun} on a table"],
        # one validation at the end: the trained model's own samples, to compare loaded weights against
        "validation.every": STEPS, "validation.num_images": 1, "validation.steps": 3, "validation.guidance_scale": 3.0,
        "validation.prompts": ["a {identifier} {class_noun}"], "validation.select": False,
    }


def _validation_image(run: Path) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / f"step-{STEPS:06d}" / "00_00.png")).astype(np.int16)


def _sample_like_validation(pipe, cfg) -> np.ndarray:
    v = cfg.validation
    settings = SampleSettings(steps=v.steps, guidance_scale=v.guidance_scale, seed=cfg.train.seed, batch_size=v.batch_size)
    return np.asarray(generate(pipe, [cfg.format_prompt(v.prompts[0])], 1, settings)[0][0]).astype(np.int16)


def _diffusers_pipeline(model: str):
    """The pipeline class diffusers itself picks for the preset folder, via from_pretrained."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from rewardbooth.models.loading import resolve_model_path

    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(model))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("method", ["dreambooth", "dpg", "rpo"])
def test_every_method_trains_and_generates_on_tiny_sdxl(subject_dir, tmp_path, method, kind):
    from diffusers import StableDiffusionXLPipeline

    cfg = load_config(None, _overrides(subject_dir, "tiny-sdxl", method, kind))
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == STEPS and all(np.isfinite(losses))

    # The run's weights reproduce the trained model's own validation sample, and differ from the base model.
    cfg, pipe = load_run_pipeline(tmp_path / "run")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    trained = _sample_like_validation(pipe, cfg)
    assert np.abs(trained - _validation_image(tmp_path / "run")).max() <= 1
    base = _sample_like_validation(make_pipeline(load_components("tiny-sdxl")), cfg)
    assert np.abs(trained - base).max() > 5

    if kind == "lora":  # diffusers' own SDXL pipeline loads the file, both text encoders included
        from safetensors import safe_open

        with safe_open(str(result.weights), "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
        official = _diffusers_pipeline("tiny-sdxl")
        assert isinstance(official, StableDiffusionXLPipeline)
        official.load_lora_weights(str(result.weights))
        assert np.abs(_sample_like_validation(official, cfg) - trained).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [4.0, 8.0])
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_kohya_file_loads_through_diffusers_with_the_trained_strength(subject_dir, tmp_path, model, alpha):
    """alpha != rank is where tools disagree: the kohya file, loaded by diffusers' non-diffusers
    loader, must give the trained model's own validation image (same seed), as the diffusers file does."""
    from safetensors import safe_open

    cfg = load_config(None, {**_overrides(subject_dir, model, "dreambooth", "lora", alpha), "prior.enabled": False})
    train(cfg, tmp_path / "run", progress=False)
    kohya = tmp_path / "run" / KOHYA_WEIGHTS_NAME
    assert kohya.is_file()  # every LoRA run writes it
    reference = _validation_image(tmp_path / "run")
    for weights in (tmp_path / "run" / LORA_WEIGHTS_NAME, kohya):
        pipe = _diffusers_pipeline(model)
        pipe.load_lora_weights(str(weights))
        assert np.abs(_sample_like_validation(pipe, cfg) - reference).max() <= 1, weights.name
    assert np.abs(_sample_like_validation(_diffusers_pipeline(model), cfg) - reference).max() > 5  # the LoRA matters

    with safe_open(str(kohya), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {alpha}
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == alpha
    assert metadata["rewardbooth_method"] == "dreambooth" and metadata["ss_sd_model_name"] == model
    te_prefixes = {k.split("_text_model_")[0] for k in keys if k.startswith("lora_te")}
    if model == "tiny-sdxl":
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert te_prefixes == {"lora_te1", "lora_te2"}
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)
    else:
        assert metadata["ss_base_model_version"] == "sd_v1" and te_prefixes == {"lora_te"}
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys)


def test_sgm_names_follow_the_sdxl_block_layout():
    # SDXL base: layers_per_block 2; down level 1's first transformer is input block 4, up level 0's last is output block 2.
    assert sgm_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_module_name("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert sgm_module_name("mid_block.attentions.0.transformer_blocks.3.attn2.to_k", 2) == "middle_block.1.transformer_blocks.3.attn2.to_k"
    assert sgm_module_name("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", 2) == "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"
    assert sgm_module_name("up_blocks.1.attentions.0.proj_out", 2) == "output_blocks.3.1.proj_out"


@pytest.mark.slow
def test_export_command_converts_and_never_overwrites(subject_dir, tmp_path, capsys):
    from peft import PeftModel
    from safetensors import safe_open

    from rewardbooth.cli import main

    cfg = load_config(None, {**_overrides(subject_dir, "tiny", "dreambooth", "lora", 8.0), "prior.enabled": False, "validation.every": 0})
    train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp16"]) == 0
    half = run / "lora_kohya_fp16.safetensors"
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp16"]) == 2  # exists: refused, file kept
    assert "already exists" in capsys.readouterr().err
    assert half.stat().st_size > 0

    # No --format: the layouts training did not write (peft), and where the others already are.
    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"kohya: {run / KOHYA_WEIGHTS_NAME} (already there)" in out and f"diffusers: {run / LORA_WEIGHTS_NAME} (already there)" in out
    assert f"peft: {run / 'peft'} (written now)" in out
    assert main(["export", str(run), "--format", "peft"]) == 2  # written by the default: refused now
    # peft: the U-Net adapter folder loads with PeftModel and gives the run's U-Net output.
    _, pipe = load_run_pipeline(run)
    base_unet = load_components("tiny").unet
    peft_unet = PeftModel.from_pretrained(base_unet, str(run / "peft" / "unet"))
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(latents, t, text).sample, pipe.unet(latents, t, text).sample)

    full = load_config(None, {**_overrides(subject_dir, "tiny", "dreambooth", "full"), "prior.enabled": False, "validation.every": 0})
    train(full, tmp_path / "full", progress=False)
    assert main(["export", str(tmp_path / "full")]) == 2
    assert "fine-tuned the full model" in capsys.readouterr().err


def test_sdxl_training_conditions_the_unet_as_the_pipeline_does(subject_dir):
    """Hidden states (both encoders' penultimate layers), pooled embedding and size ids that
    training feeds the U-Net are those StableDiffusionXLPipeline feeds it when sampling."""
    from accelerate import Accelerator

    from rewardbooth.methods.context import TrainContext

    cfg = load_config(None, _overrides(subject_dir, "tiny-sdxl", "dreambooth", "lora"))
    components = load_components("tiny-sdxl")
    ctx = TrainContext(cfg, subject_dir, Accelerator(cpu=True), components, resolution=32, weight_dtype=torch.float32)
    prompts = ["a sks toy", "a toy on a table"]
    ours = ctx.encode_prompts(prompts)
    pipe = make_pipeline(components)
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=components.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    torch.testing.assert_close(ours.time_ids, time_ids.repeat(2, 1))
    torch.testing.assert_close(ctx.encode_prompts(prompts[::-1]).pooled, pooled.flip(0))  # the per-prompt cache keeps rows apart


# --- FLUX.1 in kohya's layout (tiny-flux: one double and one single block, hidden width 32, MLP width 128) ---

FLUX_RANK, FLUX_ALPHA = 4, 8.0  # alpha != rank: a scale of 2 that every reader must apply
FILE_ALPHA = FLUX_RANK  # save_lora folds a transformer's alpha / rank into its weights: the file's own alpha is the rank


def _flux_lora_run(folder: Path, subject_dir: Path, targets: list[str]) -> Path:
    """A run folder holding a tiny-flux LoRA (seeded random, non-zero lora_B) in the diffusers layout, exported to kohya's."""
    from rewardbooth.cli import main
    from rewardbooth.models.lora import add_lora, save_lora

    transformer = load_components("tiny-flux").unet
    add_lora(transformer, FLUX_RANK, FLUX_ALPHA, 0.0, targets)
    g = torch.Generator().manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: give every module a real update
            param.data = torch.randn(param.shape, generator=g) * 0.2
    folder.mkdir(parents=True)
    save_lora(folder, transformer, pipeline_class="FluxPipeline")
    cfg = load_config(None, {"model.name": "tiny-flux", "data.instance_dir": str(subject_dir), "adapter.rank": FLUX_RANK,
                             "adapter.alpha": FLUX_ALPHA, "adapter.target_modules": targets})
    (folder / "config.yaml").write_text(cfg.to_yaml())
    assert main(["export", str(folder), "--format", "kohya"]) == 0
    return folder


@pytest.fixture(scope="module")
def flux_runs(subject_dir, tmp_path_factory):
    """"all": every Linear of the transformer. "partial": q and v only, so each fused kohya module has untrained parts
    (k; and the single block's proj_mlp) that must be zero blocks."""
    root = tmp_path_factory.mktemp("flux-kohya")
    every_linear = [n for n, m in load_components("tiny-flux").unet.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = {"all": every_linear, "partial": ["to_q", "to_v", "to_out.0"]}
    return {name: _flux_lora_run(root / name, subject_dir, modules) for name, modules in targets.items()}


def test_a_transformer_lora_file_holds_the_trained_strength_in_its_weights(tmp_path):
    """ComfyUI and Forge ignore the diffusers header's lora_alpha and apply a peft-named file's up @ down as it is (no
    `.alpha` keys): with alpha != rank the file must hold alpha / rank in its weights, its header then saying alpha =
    rank, so those tools and diffusers' load_lora_weights all apply the trained update."""
    import json

    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from safetensors.torch import load_file
    from rewardbooth.models.lora import add_lora, save_lora

    pipe = FluxPipeline.from_pretrained(resolve_model_path("tiny-flux"))
    trained = load_components("tiny-flux").unet
    add_lora(trained, FLUX_RANK, FLUX_ALPHA, 0.0, ["to_q", "to_v", "proj_mlp"])
    g = torch.Generator().manual_seed(0)
    for name, param in trained.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.2
    updates = {f"transformer.{name}": module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
               for name, module in trained.named_modules() if isinstance(module, LoraLayer)}
    file = save_lora(tmp_path, trained, pipeline_class="FluxPipeline")
    as_comfyui_reads_it = {m: up @ down for m, (down, up) in lora_modules(load_file(file)).items()}
    assert as_comfyui_reads_it.keys() == updates.keys()
    for module, update in updates.items():
        torch.testing.assert_close(as_comfyui_reads_it[module], update, msg=module)
    with safe_open(str(file), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["transformer.r"] == header["transformer.lora_alpha"] == FLUX_RANK
    with torch.no_grad():
        want = trained(**_flux_inputs()).sample
        pipe.load_lora_weights(str(file))
        torch.testing.assert_close(pipe.transformer(**_flux_inputs()).sample, want, atol=1e-5, rtol=1e-5)


# diffusers' kohya FLUX reader splits linear1 at FLUX.1-dev's widths (3072, 12288) only, and (0.42.1) returns the modules
# outside the blocks without their `transformer.` prefix, so load_lora_weights skips them. So: through the loader, the
# blocks less linear1; through its converter, every module less linear1; linear1 by its update and at FLUX.1-dev's widths.
_LINEAR1_PARTS = ("transformer.single_transformer_blocks.0.attn.", "transformer.single_transformer_blocks.0.proj_mlp.")
_LINEAR1 = "lora_unet_single_blocks_0_linear1."


def _keep(file: Path, keep, target: Path, peft_keys: bool = False) -> Path:
    """The keys of `file` that `keep` accepts, header metadata (diffusers' rank and alpha) kept. `peft_keys`: all in
    the lora_A/lora_B layout, since save_lora writes attention modules as lora.down/up and the rest as lora_A/B, and
    diffusers' loader converts a file by its first key, skipping the other layout's modules."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys() if keep(k)}, f.metadata()
    if peft_keys:
        state = {f"{m}.lora_{ab}.weight": w for m, pair in lora_modules(state).items() for ab, w in zip("AB", pair)}
    save_file(state, str(target), metadata=metadata)
    return target


def _flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.6]), "guidance": torch.tensor([3.5]),
            "img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.zeros(8, 3)}


def _delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """A LoRA module's weight update as kohya's readers apply it: up @ down * alpha / rank."""
    return up @ down * (alpha / down.shape[0])


@pytest.mark.parametrize("lora", ["all", "partial"])
def test_flux_kohya_file_gives_the_diffusers_files_transformer_output(flux_runs, tmp_path, lora):
    """diffusers' own FluxPipeline.load_lora_weights reads the kohya file's blocks (fused qkv with zero parts, both
    streams, modulations, single linear2) to the same transformer output as the diffusers file's."""
    from diffusers import FluxPipeline

    run = flux_runs[lora]
    files = (_keep(run / LORA_WEIGHTS_NAME, lambda k: k.startswith("transformer.transformer_blocks.") or
                   (k.startswith("transformer.single_transformer_blocks.") and not k.startswith(_LINEAR1_PARTS)), tmp_path / "d.safetensors", True),
             _keep(run / KOHYA_WEIGHTS_NAME, lambda k: "_blocks_" in k and not k.startswith(_LINEAR1), tmp_path / "k.safetensors"))
    pipe = FluxPipeline.from_pretrained(resolve_model_path("tiny-flux"))
    outputs = []
    with torch.no_grad():
        base = pipe.transformer(**_flux_inputs()).sample
        for weights in files:
            pipe.load_lora_weights(str(weights))
            outputs.append(pipe.transformer(**_flux_inputs()).sample)
            pipe.unload_lora_weights()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert (outputs[0] - base).abs().max() > 0.05  # the LoRA matters


@pytest.mark.parametrize("lora", ["all", "partial"])
def test_flux_kohya_modules_read_back_through_diffusers_converter(flux_runs, lora):
    """Every module less linear1, embedders and final layer included (names, the final modulation's (shift, scale)
    order, its alpha folded in), has the diffusers file's update as diffusers' kohya converter reads it back."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    run = flux_runs[lora]
    kohya = {k: v for k, v in load_file(run / KOHYA_WEIGHTS_NAME).items() if not k.startswith(_LINEAR1)}
    read = {m.removeprefix("transformer."): up @ down for m, (down, up) in lora_modules(FluxPipeline.lora_state_dict(kohya)).items()}
    ours = {m.removeprefix("transformer."): _delta(down, up, FILE_ALPHA) for m, (down, up) in
            lora_modules(load_file(run / LORA_WEIGHTS_NAME)).items() if not (m + ".").startswith(_LINEAR1_PARTS)}
    assert ours.keys() <= read.keys()
    for module, delta in read.items():  # the converter folds alpha / rank into its weights
        torch.testing.assert_close(delta, ours.get(module, torch.zeros_like(delta)), msg=module)


@pytest.mark.parametrize("lora", ["all", "partial"])
def test_flux_kohya_single_block_linear1_stacks_q_k_v_and_mlp(flux_runs, lora):
    """kohya's linear1 is BFL's fused Linear whose output is q, k, v then the MLP input (diffusers' single-file
    converter splits it so): its update must be the four diffusers modules' updates stacked, zeros where untrained."""
    from safetensors.torch import load_file

    ours, kohya = lora_modules(load_file(flux_runs[lora] / LORA_WEIGHTS_NAME)), load_file(flux_runs[lora] / KOHYA_WEIGHTS_NAME)
    prefix, name = "transformer.single_transformer_blocks.0.", "lora_unet_single_blocks_0_linear1"
    parts = [_delta(*ours[prefix + module], FILE_ALPHA) if prefix + module in ours else torch.zeros(rows, 32)
             for module, rows in (("attn.to_q", 32), ("attn.to_k", 32), ("attn.to_v", 32), ("proj_mlp", 128))]
    assert [p.any().item() for p in parts] == ([True] * 4 if lora == "all" else [True, False, True, False])
    got = _delta(kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"], kohya[name + ".alpha"].item())
    torch.testing.assert_close(got, torch.cat(parts))


def test_flux_single_block_at_flux1_dev_widths_reads_back_through_diffusers():
    """At FLUX.1-dev's widths (hidden 3072, MLP 12288) diffusers' kohya reader does split linear1: a state dict-only
    round trip (no model) gives back each module's update, and a zero proj_mlp where it was not trained."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    rank, alpha, hidden, prefix = 2, 8.0, 3072, "transformer.single_transformer_blocks.0."
    modules = ("attn.to_q", "attn.to_k", "attn.to_v")
    state = {}
    for module in modules:
        state[f"{prefix}{module}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
        state[f"{prefix}{module}.lora_B.weight"] = torch.randn(hidden, rank, generator=g)
    kohya = to_kohya(state, alpha, sdxl=False, layers_per_block=0, flux=True)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * hidden + 4 * hidden, 4 * rank)
    read = FluxPipeline.lora_state_dict(dict(kohya))  # diffusers folds alpha / rank into the weights it returns
    probe = torch.randn(hidden, 3, generator=g)
    for module in modules:
        a, b = (f"{prefix}{module}.lora_{m}.weight" for m in "AB")
        torch.testing.assert_close(read[b] @ (read[a] @ probe), state[b] @ (state[a] @ probe) * (alpha / rank), rtol=1e-4, atol=1e-3)
    assert read[prefix + "proj_mlp.lora_B.weight"].shape == (4 * hidden, rank) and not read[prefix + "proj_mlp.lora_B.weight"].any()


FLUX_KOHYA_MODULES = {  # every module of tiny-flux's transformer (one double, one single block) by its kohya name
    *(f"double_blocks_0_{s}_{m}" for s in ("img", "txt") for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")),
    "single_blocks_0_linear1", "single_blocks_0_linear2", "single_blocks_0_modulation_lin", "img_in", "txt_in",
    "time_in_in_layer", "time_in_out_layer", "guidance_in_in_layer", "guidance_in_out_layer", "vector_in_in_layer",
    "vector_in_out_layer", "final_layer_linear", "final_layer_adaLN_modulation_1",
}


def test_flux_kohya_names_alphas_and_metadata(flux_runs):
    from safetensors import safe_open

    with safe_open(str(flux_runs["all"] / KOHYA_WEIGHTS_NAME), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {k.removesuffix(".alpha"): f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert {k.split(".")[0] for k in keys} == {"lora_unet_" + m for m in FLUX_KOHYA_MODULES}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys) and len(keys) == 3 * len(alphas)
    # fused modules: alpha x parts (the rank grew as much); final layer: alpha / rank folded into up, alpha = rank. The
    # diffusers file it is written from holds the trained alpha / rank in its weights already (alpha = rank there).
    special = {"lora_unet_double_blocks_0_img_attn_qkv": 3 * FILE_ALPHA, "lora_unet_double_blocks_0_txt_attn_qkv": 3 * FILE_ALPHA,
               "lora_unet_single_blocks_0_linear1": 4 * FILE_ALPHA, "lora_unet_final_layer_linear": FLUX_RANK,
               "lora_unet_final_layer_adaLN_modulation_1": FLUX_RANK}
    assert alphas == {name: special.get(name, FILE_ALPHA) for name in alphas}
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_network_dim"] == str(FLUX_RANK) and float(metadata["ss_network_alpha"]) == FILE_ALPHA
    assert metadata["ss_sd_model_name"] == "tiny-flux" and metadata["rewardbooth_method"] == "dreambooth"


def _model_index_run(root: Path, subject_dir: Path, pipeline_class: str) -> Path:
    """root/run: a LoRA run folder over root/model, a model that is only what export reads of it (model_index.json)."""
    from safetensors.torch import save_file

    model = root / "model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class, "transformer": ["diffusers", "X"]}))
    run = root / "run"
    run.mkdir()
    cfg = load_config(None, {"model.name": str(model), "data.instance_dir": str(subject_dir), "adapter.kind": "lora"})
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_file({"transformer.x.lora_A.weight": torch.zeros(4, 8), "transformer.x.lora_B.weight": torch.zeros(8, 4)}, str(run / LORA_WEIGHTS_NAME))
    return root


@pytest.mark.parametrize("pipeline_class", ["StableDiffusion3Pipeline", "Flux2KleinPipeline", "ZImagePipeline",
                                            "QwenImagePipeline"])
def test_kohya_export_is_refused_for_sd3_flux2_zimage_and_qwenimage_by_name(subject_dir, tmp_path, capsys, pipeline_class):
    from rewardbooth.cli import main

    run = _model_index_run(tmp_path, subject_dir, pipeline_class) / "run"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "kohya"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pipeline_class in err and "--format kohya" in err and "--format diffusers" in err
    assert not (run / KOHYA_WEIGHTS_NAME).exists()


def test_export_without_a_format_writes_only_what_the_run_lacks(subject_dir, tmp_path, capsys):
    """A finished FLUX.1 LoRA run holds the diffusers and kohya files: the default export says where, writes nothing and
    succeeds; with the kohya file gone it writes it again; an SD3 run has nothing but its diffusers file to give."""
    from rewardbooth.cli import main

    run = _flux_lora_run(tmp_path / "flux", subject_dir, ["to_q", "to_v"])
    kohya, before = run / KOHYA_WEIGHTS_NAME, (run / KOHYA_WEIGHTS_NAME).stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"kohya: {kohya} (already there)", f"diffusers: {run / LORA_WEIGHTS_NAME} (already there)"]
    assert kohya.stat().st_mtime_ns == before and not (run / "peft").exists()
    kohya.unlink()
    assert main(["export", str(run)]) == 0
    assert f"kohya: {kohya} (written now)" in capsys.readouterr().out and kohya.is_file()
    assert main(["export", str(run), "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "--format" in capsys.readouterr().err

    sd3 = _model_index_run(tmp_path / "sd3", subject_dir, "StableDiffusion3Pipeline") / "run"
    assert main(["export", str(sd3)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"diffusers: {sd3 / LORA_WEIGHTS_NAME} (already there)"]
    assert not (sd3 / KOHYA_WEIGHTS_NAME).exists()


def test_flux_clip_lora_is_kohya_te1_and_reads_back_through_diffusers():
    g = torch.Generator().manual_seed(0)
    module = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    state = {f"{module}.lora_A.weight": torch.randn(4, 32, generator=g), f"{module}.lora_B.weight": torch.randn(32, 4, generator=g)}
    kohya = to_kohya(state, 8.0, sdxl=False, layers_per_block=0, flux=True)
    assert set(kohya) == {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}" for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    from diffusers import FluxPipeline

    # text_encoder.<module>.to_q_lora.{down,up}.weight, alpha folded in (in place: hence the copies)
    read = FluxPipeline.lora_state_dict({k: v.clone() for k, v in kohya.items()})
    down, up = (next(v for k, v in read.items() if k.startswith("text_encoder.") and f".{m}." in k) for m in ("down", "up"))
    torch.testing.assert_close(up @ down, _delta(*lora_modules(state)[module], 8.0))


def test_a_flux_module_without_a_kohya_name_is_refused_by_name():
    state = {"transformer.pos_extra.lora_A.weight": torch.zeros(4, 8), "transformer.pos_extra.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(ConfigError, match=r"pos_extra has no kohya FLUX name.*--format diffusers"):
        to_kohya(state, 4.0, sdxl=False, layers_per_block=0, flux=True)
