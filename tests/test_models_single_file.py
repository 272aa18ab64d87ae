"""Single-file checkpoints for --model: FILE.safetensors[+BASE] through diffusers' from_single_file.

The tiny presets' weights, with seeded noise added (a "fine-tune"), are written back into the original layouts (BFL's
FLUX.1, Stability's SD3, LDM's SD 1.x) by inverting diffusers' own key conversion; loaded on the preset as its base, the
file must give the fine-tune's denoiser output, so the weights came from the file and not from the base folder.
SDXL is not covered: at the tiny sizes both of its text encoders are 32 wide, and diffusers' single-file loader then
tells its CLIP-L and OpenCLIP-bigG weights apart by width and cannot.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from rewardbooth.cli import main
from rewardbooth.methods import load_config
from rewardbooth.errors import ConfigError
from rewardbooth.models.loading import (
    FLUX2_PIPELINE,
    FLUX_PIPELINE,
    QWENIMAGE_PIPELINE,
    SD3_PIPELINE,
    ZIMAGE_PIPELINE,
    SD_PIPELINE,
    SDXL_PIPELINE,
    load_components,
    read_model_config,
    resolve_model_path,
)
from rewardbooth.training.finished_run import load_run_pipeline


class Inverse:
    """An original-layout state dict built from a diffusers one; `done` checks every diffusers tensor was placed."""

    def __init__(self, state: dict):
        self.state, self.out, self.used = state, {}, set()

    def put(self, original: str, *modules: str, param_name: str | None = None, fn=None, sep: str = "."):
        """`original`.weight/.bias from the diffusers `modules`' ones, fused along dim 0 when there are several."""
        for param in ("weight", "bias"):
            names = [f"{m}.{param}" for m in modules]
            if all(n in self.state for n in names):
                value = torch.cat([self.state[n] for n in names])
                self.out[f"{original}{sep}{param_name or param}"] = fn(value) if fn else value
                self.used.update(names)

    def tensor(self, original: str, name: str):
        self.out[original] = self.state[name]
        self.used.add(name)

    def done(self) -> dict:
        assert self.used == set(self.state), sorted(set(self.state) - self.used)
        return self.out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the original final norms and diffusers' differ in this order."""
    return torch.cat(t.chunk(2)[::-1])


def count(state: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})


# diffusers' names in a joint (MMDiT) block's image and text streams: q/k/v, output, q/k norms, MLP
DIFFUSERS_STREAMS = (("attn.to_{}", "attn.to_out.0", "attn.norm_{}", "ff"),
                     ("attn.add_{}_proj", "attn.to_add_out", "attn.norm_added_{}", "ff_context"))


def joint_streams(inv: Inverse, o: str, d: str, prefixes: tuple, names: tuple, norm_param: str | None = None):
    """Both streams of a joint block, alike in FLUX.1 and SD3: `prefixes` name the original image and text streams,
    `names` their (fused qkv, output, q norm, k norm, MLP in, MLP out)."""
    for prefix, (qkv, out, norm, ff) in zip(prefixes, DIFFUSERS_STREAMS):
        o_qkv, o_out, o_q, o_k, o_in, o_mlp_out = (o + prefix + n for n in names)
        inv.put(o_qkv, *(d + qkv.format(x) for x in "qkv"))
        inv.put(o_out, d + out)
        inv.put(o_q, d + norm.format("q"), param_name=norm_param)
        inv.put(o_k, d + norm.format("k"), param_name=norm_param)
        inv.put(o_in, d + f"{ff}.net.0.proj")
        inv.put(o_mlp_out, d + f"{ff}.net.2")


def flux_to_bfl(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's layout (flux1-dev.safetensors), the inverse of
    diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    inv = Inverse(state)
    for original, module in (("time_in", "time_text_embed.timestep_embedder"), ("vector_in", "time_text_embed.text_embedder"),
                             ("guidance_in", "time_text_embed.guidance_embedder")):
        inv.put(f"{original}.in_layer", f"{module}.linear_1")
        inv.put(f"{original}.out_layer", f"{module}.linear_2")
    inv.put("txt_in", "context_embedder")
    inv.put("img_in", "x_embedder")
    inv.put("final_layer.linear", "proj_out")
    inv.put("final_layer.adaLN_modulation.1", "norm_out.linear", fn=swap_halves)
    for i in range(count(state, "transformer_blocks")):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        inv.put(o + "img_mod.lin", d + "norm1.linear")
        inv.put(o + "txt_mod.lin", d + "norm1_context.linear")
        joint_streams(inv, o, d, ("img_", "txt_"), ("attn.qkv", "attn.proj", "attn.norm.query_norm", "attn.norm.key_norm",
                                                    "mlp.0", "mlp.2"), norm_param="scale")
    for i in range(count(state, "single_transformer_blocks")):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        inv.put(o + "modulation.lin", d + "norm.linear")
        inv.put(o + "linear1", *(d + f"attn.to_{x}" for x in "qkv"), d + "proj_mlp")
        inv.put(o + "linear2", d + "proj_out")
        inv.put(o + "norm.query_norm", d + "attn.norm_q", param_name="scale")
        inv.put(o + "norm.key_norm", d + "attn.norm_k", param_name="scale")
    return inv.done()


def sd3_to_original(state: dict) -> dict:
    """A diffusers SD3Transformer2DModel state dict in Stability's MMDiT layout (sd3.5_medium.safetensors without the
    prefix), the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    inv = Inverse(state)
    inv.tensor("pos_embed", "pos_embed.pos_embed")
    inv.put("x_embedder.proj", "pos_embed.proj")
    inv.put("context_embedder", "context_embedder")
    for original, module in (("t_embedder", "time_text_embed.timestep_embedder"), ("y_embedder", "time_text_embed.text_embedder")):
        inv.put(f"{original}.mlp.0", f"{module}.linear_1")
        inv.put(f"{original}.mlp.2", f"{module}.linear_2")
    inv.put("final_layer.linear", "proj_out")
    inv.put("final_layer.adaLN_modulation.1", "norm_out.linear", fn=swap_halves)
    for i in range(count(state, "transformer_blocks")):
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = f"{d}ff_context.net.2.weight" not in state  # the last block's context stream ends in a final-style norm
        inv.put(o + "x_block.adaLN_modulation.1", d + "norm1.linear")
        inv.put(o + "context_block.adaLN_modulation.1", d + "norm1_context.linear", fn=swap_halves if last else None)
        joint_streams(inv, o, d, ("x_block.", "context_block."),
                      ("attn.qkv", "attn.proj", "attn.ln_q", "attn.ln_k", "mlp.fc1", "mlp.fc2"))
    return inv.done()


def flux2_to_bfl(state: dict) -> dict:
    """A diffusers Flux2Transformer2DModel state dict in BFL's layout (flux-2-klein-4b.safetensors), the inverse of
    diffusers' convert_flux2_transformer_checkpoint_to_diffusers: q, k, v fused per stream, norms as `scale`."""
    inv = Inverse(state)
    inv.put("img_in", "x_embedder")
    inv.put("txt_in", "context_embedder")
    inv.put("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1")
    inv.put("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2")
    for stream in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        inv.put(f"{stream}.lin", f"{stream}.linear")
    inv.put("final_layer.linear", "proj_out")
    inv.put("final_layer.adaLN_modulation.1", "norm_out.linear", fn=swap_halves)
    for i in range(count(state, "transformer_blocks")):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for prefix, qkv, norm, out, ff in (("img_", "attn.to_{}", "attn.norm_{}", "attn.to_out.0", "ff"),
                                           ("txt_", "attn.add_{}_proj", "attn.norm_added_{}", "attn.to_add_out", "ff_context")):
            inv.put(o + prefix + "attn.qkv", *(d + qkv.format(x) for x in "qkv"))
            inv.put(o + prefix + "attn.norm.query_norm", d + norm.format("q"), param_name="scale")
            inv.put(o + prefix + "attn.norm.key_norm", d + norm.format("k"), param_name="scale")
            inv.put(o + prefix + "attn.proj", d + out)
            inv.put(o + prefix + "mlp.0", d + f"{ff}.linear_in")
            inv.put(o + prefix + "mlp.2", d + f"{ff}.linear_out")
    for i in range(count(state, "single_transformer_blocks")):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        inv.put(o + "linear1", d + "to_qkv_mlp_proj")
        inv.put(o + "linear2", d + "to_out")
        inv.put(o + "norm.query_norm", d + "norm_q", param_name="scale")
        inv.put(o + "norm.key_norm", d + "norm_k", param_name="scale")
    return inv.done()


def zimage_to_original(state: dict) -> dict:
    """A diffusers ZImageTransformer2DModel state dict in Z-Image's own layout (z_image_turbo_bf16.safetensors), the
    inverse of diffusers' convert_z_image_transformer_checkpoint_to_diffusers: q, k, v fused, its own module names."""
    inv = Inverse(state)
    for key in state:
        original = key.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        original = original.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_k.", ".attention.k_norm.")
        original = original.replace(".attention.norm_q.", ".attention.q_norm.")
        if ".attention.to_q." in key:
            inv.put(original.replace(".to_q.weight", ".qkv"), *(key.replace(".to_q.weight", f".to_{x}") for x in "qkv"))
        elif not re.search(r"\.attention\.to_[kv]\.", key):
            inv.tensor(original, key)
    return inv.done()


LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet2DConditionModel key in the LDM layout (SD 1.x's model.diffusion_model.*), the inverse of
    diffusers' convert_ldm_unet_checkpoint: input/output blocks are numbered across levels, layers_per_block + 1 each."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    module, _, param = key.rpartition(".")
    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]
    top = {**mapping["layers"], **mapping["addition_embed_type"]}.get(key)  # SDXL's pooled-text + size embedding
    if top is not None:
        return top
    step = config.layers_per_block + 1
    level, part, j, inner = re.fullmatch(r"(?:down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(\w+)\.(\d+)\.?(.*)", module).groups()
    level, j = int(level or 0), int(j)
    inner = ".".join(filter(None, (LDM_RESNET.get(inner, inner) if part == "resnets" else inner, param)))
    if key.startswith("down_blocks"):
        if part == "downsamplers":
            return f"input_blocks.{(level + 1) * step}.0.op.{param}"
        return f"input_blocks.{1 + level * step + j}.{0 if part == 'resnets' else 1}.{inner}"
    if key.startswith("up_blocks"):
        if part == "upsamplers":
            has_attention = config.up_block_types[level].startswith("CrossAttn")
            return f"output_blocks.{level * step + step - 1}.{2 if has_attention else 1}.conv.{param}"
        return f"output_blocks.{level * step + j}.{0 if part == 'resnets' else 1}.{inner}"
    return f"middle_block.{2 * j if part == 'resnets' else 1}.{inner}"


def ldm_vae_key(key: str, config) -> str:
    """A diffusers AutoencoderKL key in the LDM layout, the inverse of diffusers' convert_ldm_vae_checkpoint
    (the decoder's levels count the other way)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"].get(key)
    if top is not None:
        return top
    key = key.replace("conv_shortcut", "nin_shortcut")
    match = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if match:
        coder, way, level, part, j, rest = match.groups()
        level = int(level) if way == "down" else len(config.up_block_types) - 1 - int(level)
        slot = f"block.{j}" if part == "resnets" else f"{way}sample"
        return f"{coder}.{way}.{level}.{slot}.{rest}"
    coder, part, j, rest = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key).groups()
    if part == "resnets":
        return f"{coder}.mid.block_{int(j) + 1}.{rest}"
    layer, _, tail = rest.partition(".")
    return f"{coder}.mid.attn_1.{LDM_VAE_ATTENTION[layer]}.{tail.removeprefix('0.')}"


def open_clip(encoder) -> dict:
    """SDXL's second text encoder (diffusers' CLIPTextModelWithProjection) in OpenCLIP's layout, the inverse of
    diffusers' convert_open_clip_checkpoint: q, k, v fused into in_proj, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping, state = DIFFUSERS_TO_LDM_MAPPING["openclip"], encoder.state_dict()
    inv = Inverse(state)
    for key, original in mapping["layers"].items():
        inv.tensor(original, key)
    inv.out["text_projection"] = inv.out["text_projection"].T
    for key in [k for k in state if k.startswith("text_model.encoder.layers.")]:
        original = "transformer." + key
        for new, old in mapping["transformer"].items():
            original = original.replace(new, old)
        if ".q_proj." in key:  # attn.in_proj_weight / _bias
            module = key.rpartition(".")[0]
            inv.put(original.rpartition(".q_proj.")[0] + ".in_proj", *(module.replace(".q_", f".{x}_") for x in "qkv"), sep="_")
        elif not re.search(r"\.[kv]_proj\.", key):
            inv.tensor(original, key)
    return inv.done()


def ldm_checkpoint(components) -> dict:
    """A tiny SD 1.x or SDXL pipeline as one original checkpoint (v1-5-pruned.safetensors, sd_xl_base_1.0.safetensors):
    U-Net, VAE and text encoder(s) under their LDM / SGM prefixes."""
    unet, vae = components.unet, components.vae
    out = {f"model.diffusion_model.{ldm_unet_key(k, unet.config)}": v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():  # the mid attention's linear layers are 1x1 convolutions in LDM
        ldm = ldm_vae_key(k, vae.config)
        out[f"first_stage_model.{ldm}"] = v[..., None, None] if ".attn_1." in ldm and v.ndim == 2 else v
    assert len(out) == len(unet.state_dict()) + len(vae.state_dict())  # no two keys on one name
    clip = "conditioner.embedders.0.transformer" if components.is_sdxl else "cond_stage_model.transformer"
    out.update({f"{clip}.text_model.{k.removeprefix('text_model.')}": v for k, v in components.text_encoder.state_dict().items()})
    if components.is_sdxl:
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip(components.text_encoder_2).items()})
    return out


FLUX1_WIDTH, FLUX1_MLP = 3072, 12288


def converter_at_any_width(convert):
    """diffusers' BFL -> diffusers FLUX converter splits single blocks' fused linear1 at FLUX.1's real widths (3072,
    12288): place the tiny model's q, k, v, mlp rows at those offsets, convert, and cut the results back to size."""

    def converted(checkpoint, **kwargs):
        width = checkpoint["img_in.weight"].shape[0]
        for key in [k for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
            tiny = checkpoint[key]
            wide = tiny.new_zeros((3 * FLUX1_WIDTH + FLUX1_MLP, *tiny.shape[1:]))
            for n, part in enumerate(tiny.split([width] * 3 + [4 * width])):
                wide[n * FLUX1_WIDTH: n * FLUX1_WIDTH + len(part)] = part
            checkpoint[key] = wide
        out = convert(checkpoint, **kwargs)
        for key, value in out.items():
            if key.startswith("single_transformer_blocks.") and (".attn.to_" in key or ".proj_mlp." in key):
                out[key] = value[: 4 * width if ".proj_mlp." in key else width]
        return out

    return converted


@pytest.fixture
def flux_converter(monkeypatch):
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    entry = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    monkeypatch.setitem(entry, "checkpoint_mapping_fn", converter_at_any_width(entry["checkpoint_mapping_fn"]))


def perturbed(*modules):
    """The modules with seeded noise on every weight: what a loaded model shares with them came from the file, not
    from the preset folder used as its base."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    return modules


def write(tmp_path, name: str, state: dict):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def flux_fine_tune(flux_converter):
    return perturbed(load_components("tiny-flux").unet)[0]


@pytest.fixture
def flux_file(tmp_path, flux_fine_tune):
    return write(tmp_path, "flux1-tiny.safetensors", flux_to_bfl(flux_fine_tune.state_dict()))


def denoiser_output(components, resolution: int) -> torch.Tensor:
    family = components.family()
    g = torch.Generator().manual_seed(0)
    side = resolution // family.latent_scale  # the family's own latent space (FLUX.2: patchified, 4x the channels)
    latents = torch.randn(2, family.latent_channels, side, side, generator=g)
    text = family.encode_prompts(components.text_encoders, ["a sks toy", "a toy"], resolution)
    with torch.no_grad():
        return family.predict(components.unet, latents, torch.tensor([250, 750]), text)


def test_flux_transformer_file_on_a_base_folder_is_the_fine_tune(flux_file, flux_fine_tune):
    preset = load_components("tiny-flux")
    loaded = load_components(f"{flux_file}+tiny-flux")
    assert loaded.pipeline_class == FLUX_PIPELINE and type(loaded.family()) is type(preset.family())
    assert read_model_config(f"{flux_file}+tiny-flux", None, "model_index.json")["_class_name"] == FLUX_PIPELINE
    assert not torch.equal(denoiser_output(loaded, 64), denoiser_output(preset, 64))
    preset.unet = flux_fine_tune
    torch.testing.assert_close(denoiser_output(loaded, 64), denoiser_output(preset, 64), rtol=0, atol=0)
    # VAE, CLIP and T5 are the base folder's
    for mine, theirs in zip((loaded.vae, *loaded.text_encoders), (preset.vae, *preset.text_encoders)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name


def test_sd3_transformer_file_on_a_base_folder_is_the_fine_tune(tmp_path):
    preset = load_components("tiny-sd3")
    perturbed(preset.unet)
    file = write(tmp_path, "sd3-tiny.safetensors", {f"model.diffusion_model.{k}": v for k, v in
                                                    sd3_to_original(preset.unet.state_dict()).items()})
    loaded = load_components(f"{file}+tiny-sd3")
    assert loaded.pipeline_class == SD3_PIPELINE
    torch.testing.assert_close(denoiser_output(loaded, 64), denoiser_output(preset, 64), rtol=0, atol=0)


@pytest.mark.parametrize("preset, pipeline_class, original", [
    ("tiny-flux2", FLUX2_PIPELINE, flux2_to_bfl),  # BFL's layout
    ("tiny-zimage", ZIMAGE_PIPELINE, zimage_to_original),  # Z-Image's own, under ComfyUI's prefix
    ("tiny-qwenimage", QWENIMAGE_PIPELINE, dict),  # diffusers' names under ComfyUI's prefix, as ComfyUI ships it
])
def test_newer_flow_transformer_files_on_a_base_folder_are_the_fine_tune(tmp_path, preset, pipeline_class, original):
    base = load_components(preset)
    perturbed(base.unet)
    prefix = "" if preset == "tiny-flux2" else "model.diffusion_model."
    file = write(tmp_path, f"{preset}.safetensors", {prefix + k: v for k, v in original(base.unet.state_dict()).items()})
    loaded = load_components(f"{file}+{preset}")
    assert loaded.pipeline_class == pipeline_class and type(loaded.unet) is type(base.unet)
    fresh = load_components(preset)
    assert not torch.equal(denoiser_output(loaded, 64), denoiser_output(fresh, 64))
    torch.testing.assert_close(denoiser_output(loaded, 64), denoiser_output(base, 64), rtol=0, atol=0)


def test_a_file_missing_some_of_the_transformers_tensors_is_refused_by_name(tmp_path):
    state = flux2_to_bfl(load_components("tiny-flux2").unet.state_dict())
    state.pop("single_blocks.0.linear2.weight")
    file = write(tmp_path, "partial.safetensors", state)
    with pytest.raises(ConfigError, match=r"partial\.safetensors lacks tensors its base tiny-flux2's transformer has"):
        load_components(f"{file}+tiny-flux2")


def test_sd_checkpoint_in_the_ldm_layout_on_a_base_folder_is_the_fine_tune(tmp_path):
    preset = load_components("tiny")
    perturbed(preset.unet, preset.vae, preset.text_encoder)
    file = write(tmp_path, "sd15-tiny.safetensors", ldm_checkpoint(preset))
    # a base folder like SD 1.5's own: a sampling scheduler (PNDM), which training does not use
    base = tmp_path / "sd15-base"
    shutil.copytree(resolve_model_path("tiny"), base)
    for file_name, key, value in (("model_index.json", "scheduler", ["diffusers", "PNDMScheduler"]),
                                  ("scheduler/scheduler_config.json", "_class_name", "PNDMScheduler")):
        (base / file_name).write_text(json.dumps({**json.loads((base / file_name).read_text()), key: value}))
    loaded = load_components(f"{file}+{base}")
    assert loaded.pipeline_class == SD_PIPELINE and not loaded.is_sdxl
    torch.testing.assert_close(denoiser_output(loaded, 32), denoiser_output(preset, 32), rtol=0, atol=0)
    # the VAE and the text encoder come from the file too
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(loaded.vae.encode(x).latent_dist.mean).sample,
                                   preset.vae.decode(preset.vae.encode(x).latent_dist.mean).sample, rtol=0, atol=0)
    assert type(loaded.noise_scheduler) is type(preset.noise_scheduler) is DDPMScheduler
    assert loaded.noise_scheduler.config.prediction_type == preset.noise_scheduler.config.prediction_type


def test_sdxl_checkpoint_in_the_sgm_layout_on_a_base_folder_is_the_fine_tune(tmp_path, monkeypatch):
    from rewardbooth.models.tiny import SDXL_SHAPES, TINY_PRESETS, build_tiny_pipeline

    # diffusers' single-file loader finds each text encoder's weights by its width: tiny-sdxl's are both 32 wide
    monkeypatch.setitem(SDXL_SHAPES["tiny"], "text_2", dict(SDXL_SHAPES["tiny"]["text_2"], text_hidden=64, text_ffn=128))
    base = tmp_path / "sdxl-base"
    build_tiny_pipeline(TINY_PRESETS["tiny-sdxl"]).save_pretrained(base)
    preset = load_components(str(base))
    perturbed(preset.unet, preset.vae, *preset.text_encoders)
    file = write(tmp_path, "sdxl-tiny.safetensors", ldm_checkpoint(preset))
    loaded = load_components(f"{file}+{base}")
    assert loaded.pipeline_class == SDXL_PIPELINE and loaded.is_sdxl
    torch.testing.assert_close(denoiser_output(loaded, 32), denoiser_output(preset, 32), rtol=0, atol=0)


def test_two_training_steps_on_a_flux_file_and_the_run_reloads(tmp_path, subject_dir, flux_file, flux_fine_tune):
    run, model = tmp_path / "run", f"{flux_file}+tiny-flux"
    code = main(["train", "--model", model, "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
                 "--steps", "2", "--resolution", "64", "--num-class-images", "1", "--set", "prior.generation_steps=2",
                 "--validation-every", "0", "--quiet"])
    assert code == 0
    assert load_config(run / "config.yaml").model.name == model  # the run records the file and its base
    _, pipe = load_run_pipeline(run)
    assert type(pipe).__name__ == FLUX_PIPELINE
    assert torch.equal(pipe.transformer.x_embedder.weight, flux_fine_tune.x_embedder.weight)  # the file's, LoRA on top
    image = pipe("a sks toy", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def _train_error(capsys, tmp_path, subject_dir, model: str) -> str:
    code = main(["train", "--model", model, "--instance-dir", str(subject_dir), "--class-noun", "toy",
                 "--output", str(tmp_path / "run"), "--resolution", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    return err


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("pickle", "only .safetensors"),
    ("not safetensors", "not a readable safetensors file"),
    ("unknown layout", "in no layout diffusers knows"),
    ("other family", "its base tiny is a StableDiffusionPipeline"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, subject_dir, capsys, flux_file, case, expected):
    files = {"missing": tmp_path / "nowhere.safetensors", "pickle": tmp_path / "model.ckpt",
             "not safetensors": tmp_path / "page.safetensors", "unknown layout": tmp_path / "lora.safetensors",
             "other family": flux_file}
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "page.safetensors").write_text("<html>not found</html>")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    model = f"{files[case]}+tiny" if case == "other family" else str(files[case])
    err = _train_error(capsys, tmp_path, subject_dir, model)
    assert expected in err and str(files[case]) in err


def test_without_a_base_offline_the_error_names_the_file_and_the_official_base(tmp_path, subject_dir, capsys, flux_file,
                                                                               monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    err = _train_error(capsys, tmp_path, subject_dir, str(flux_file))
    assert str(flux_file) in err and "black-forest-labs/FLUX.1-dev" in err and "+BASE" in err


def test_fp8_files_load_with_a_warning_and_scaled_fp8_is_refused(tmp_path):
    """ComfyUI ships fp8 transformers: plain ones load as their own values; scaled ones carry scales diffusers' loader
    would drop as unknown names, leaving every weight wrong by its scale."""
    state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
             for k, v in flux2_to_bfl(load_components("tiny-flux2").unet.state_dict()).items()}
    with pytest.warns(UserWarning, match="fp8: training starts from the fp8-rounded weights"):
        loaded = load_components(f"{write(tmp_path, 'fp8.safetensors', state)}+tiny-flux2")
    expected = state["img_in.weight"].to(loaded.unet.x_embedder.weight.dtype)
    assert torch.equal(loaded.unet.x_embedder.weight, expected)
    state["img_in.scale_weight"] = torch.ones(())
    with pytest.raises(ConfigError, match=r"scaled fp8 weights \(img_in\.scale_weight"):
        load_components(f"{write(tmp_path, 'scaled.safetensors', state)}+tiny-flux2")


@pytest.mark.parametrize("width, base", [(3072, "black-forest-labs/FLUX.2-klein-base-4B"),
                                         (4096, "black-forest-labs/FLUX.2-klein-base-9B")])
def test_a_flux2_file_without_a_base_names_the_klein_base_of_its_width(tmp_path, monkeypatch, width, base):
    """diffusers calls every FLUX.2 file FLUX.2-dev (another pipeline); the klein size is told by the image input."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    file = write(tmp_path, "flux-2-klein.safetensors", {"single_stream_modulation.lin.weight": torch.zeros(2, 2),
                                                         "img_in.weight": torch.zeros(width, 1)})
    with pytest.raises(ConfigError, match=re.escape(f"its base {base} is not available")):
        read_model_config(str(file), None, "model_index.json")

