"""The flow-matching presets: built offline, saved, loaded back with from_pretrained, and sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewardbooth.models.tiny_flow import FLOW_PRESETS, build_flow_component, build_flow_pipeline, flow_configs, flow_model_path

PIPELINES = {"tiny-flux": "FluxPipeline", "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux2": "Flux2KleinPipeline",
             "tiny-zimage": "ZImagePipeline", "tiny-qwenimage": "QwenImagePipeline"}
# What each family's real checkpoint has: FLUX.1-dev's guidance embedding and resolution-dependent shift,
# SD3's fixed shift, the VAEs' latent channels and statistics.
FAMILY_CONFIG = {
    "tiny-flux": {"transformer.guidance_embeds": True, "scheduler.use_dynamic_shifting": True, "scheduler.max_shift": 1.15,
                  "vae.latent_channels": 16, "vae.scaling_factor": 0.3611, "vae.shift_factor": 0.1159},
    "tiny-sd3": {"scheduler.use_dynamic_shifting": False, "scheduler.shift": 3.0, "vae.latent_channels": 16,
                 "vae.scaling_factor": 1.5305, "vae.shift_factor": 0.0609},
    # FLUX.2 [klein] base: no guidance embedding (real CFG), the 32-channel batch-normalised VAE.
    "tiny-flux2": {"transformer.guidance_embeds": False, "scheduler.use_dynamic_shifting": True, "vae.latent_channels": 32,
                   "transformer.in_channels": 128},
    # Z-Image-Turbo: FLUX.1's VAE, a fixed scheduler shift of 3, the text encoder's width as the caption width.
    "tiny-zimage": {"scheduler.use_dynamic_shifting": False, "scheduler.shift": 3.0, "vae.latent_channels": 16,
                    "vae.scaling_factor": 0.3611, "vae.shift_factor": 0.1159, "transformer.cap_feat_dim": 16,
                    "text_encoder.hidden_size": 16},
    # Qwen-Image: 2x2-packed 16-channel latents, no guidance embedding (true CFG), FLUX.1's dynamic shift with its own
    # range, the video VAE's 16 latent channels and per-channel statistics, the Qwen2.5-VL width as the text width.
    "tiny-qwenimage": {"transformer.guidance_embeds": False, "transformer.in_channels": 64, "transformer.out_channels": 16,
                       "scheduler.use_dynamic_shifting": True, "scheduler.max_shift": 0.9, "scheduler.max_image_seq_len": 8192,
                       "scheduler.shift_terminal": 0.02, "vae.z_dim": 16,
                       "transformer.joint_attention_dim": 16},
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def loaded(request):
    from diffusers import DiffusionPipeline

    name = request.param
    pipe = DiffusionPipeline.from_pretrained(flow_model_path(name))
    pipe.set_progress_bar_config(disable=True)
    return name, pipe


def _generate(pipe, name: str, seed: int = 0, prompt: str = "a photo of sks dog"):
    kwargs = {"guidance_scale": 3.5} if name == "tiny-flux" else {}  # FLUX.1-dev's embedded guidance
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=2, height=64, width=64, generator=generator, **kwargs).images[0]


def test_loads_the_pipeline_class_offline(loaded):
    name, pipe = loaded
    assert type(pipe).__name__ == PIPELINES[name]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.vae_scale_factor == 8


def test_generation_is_deterministic(loaded):
    name, pipe = loaded
    first, again = _generate(pipe, name), _generate(pipe, name)
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(_generate(pipe, name, seed=1)))


def test_building_twice_gives_the_saved_weights(loaded):
    name, pipe = loaded
    fresh = build_flow_pipeline(name)
    for component in ("transformer", "text_encoder", "vae"):
        saved = getattr(pipe, component).state_dict()
        for key, value in getattr(fresh, component).state_dict().items():
            assert torch.equal(value, saved[key]), f"{component}.{key}"


def test_family_configs(loaded):
    name, pipe = loaded
    for field, value in FAMILY_CONFIG[name].items():
        component, key = field.split(".")
        assert getattr(getattr(pipe, component).config, key) == value, field


def test_qwenimage_template_prefix_is_the_tokens_its_pipeline_drops():
    """QwenImagePipeline drops the first 34 tokens of its chat-templated prompt (Qwen's count for the system prompt): on the
    tiny preset those 34 are the whole system prompt too, so the prompt's tokens and the template's tail are what remain."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(flow_model_path("tiny-qwenimage"))
    prefix, rest = pipe.prompt_template_encode.split("{}")
    assert len(pipe.tokenizer(prefix)["input_ids"]) == pipe.prompt_template_encode_start_idx == 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a sks toy"))["input_ids"]
    assert pipe.tokenizer.decode(ids[34:]) == "a sks toy" + rest


def test_t5_tokenizer_round_trips_through_auto_tokenizer():
    from transformers import AutoTokenizer

    path = flow_model_path("tiny-flux")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer_2")
    ids = tokenizer("A photo of sks dog")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A photo of sks dog"


def test_real_size_presets_are_configs_only():
    for name in ("flux-random", "sd35-random"):
        assert not FLOW_PRESETS[name].tiny
        with pytest.raises(ValueError):
            flow_model_path(name)
    flux = flow_configs("flux-random")
    assert (flux["transformer"]["num_layers"], flux["transformer"]["num_single_layers"]) == (19, 38)
    assert flux["text_encoder_2"]["d_model"] == 4096 and flux["vae"]["block_out_channels"] == (128, 256, 512, 512)
    sd35 = flow_configs("sd35-random")
    assert sd35["transformer"]["caption_projection_dim"] == 2432 and sd35["text_encoder_2"]["hidden_size"] == 1280
    with torch.device("meta"):
        transformer = build_flow_component(sd35["transformer"])
    assert 8.0e9 < sum(p.numel() for p in transformer.parameters()) < 8.1e9  # SD3.5 Large: 8.1B


@pytest.mark.parametrize("name, transformer_params, encoder_params", [
    ("flux2-klein-random", (3.8e9, 4.0e9), (3.9e9, 4.1e9)),  # klein base 4B + Qwen3-4B
    ("flux2-klein-9b-random", (8.9e9, 9.2e9), (7.9e9, 8.3e9)),  # klein base 9B + Qwen3-8B
    ("zimage-random", (6.1e9, 6.2e9), (4.0e9, 4.1e9)),  # Z-Image 6B + Qwen3-4B without its LM head (tied anyway)
    ("qwenimage-random", (20.4e9, 20.5e9), (8.2e9, 8.4e9)),  # Qwen-Image 20B + Qwen2.5-VL 7B (its vision tower too)
])
def test_flux2_klein_zimage_and_qwenimage_real_sizes(name, transformer_params, encoder_params):
    configs = flow_configs(name)
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in build_flow_component(configs[c]).parameters()) for c in ("transformer", "text_encoder")]
    assert transformer_params[0] < sizes[0] < transformer_params[1] and encoder_params[0] < sizes[1] < encoder_params[1], sizes


@pytest.mark.parametrize("name", ["tiny-flux2", "tiny"])
def test_another_vae_is_loaded_as_the_models_vae_class_and_used(name, tmp_path):
    """--vae (model.vae) replaces the model's VAE on flow models too (it was ignored there), as the class the model names."""
    from rewardbooth.models.loading import load_components

    own = load_components(name)
    with torch.no_grad():
        next(own.vae.parameters()).add_(0.5)  # another VAE of the same shape: its weights tell it apart
    own.vae.save_pretrained(tmp_path / "vae")
    other = load_components(name, vae=str(tmp_path / "vae"))
    assert type(other.vae) is type(own.vae)
    torch.testing.assert_close(next(other.vae.parameters()), next(own.vae.parameters()))
    assert not torch.equal(next(other.vae.parameters()), next(load_components(name).vae.parameters()))


@pytest.mark.parametrize(("name", "donor"), [("tiny-flux", "tiny"), ("tiny", "tiny-sd3")])
def test_a_vae_of_another_family_is_refused_in_one_line(name, donor, tmp_path):
    from rewardbooth.errors import ConfigError
    from rewardbooth.models.loading import load_components

    load_components(donor).vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match=r"^--vae .*: its latents have \d+ channels, .*'s VAE has \d+ \(a VAE made for another"):
        load_components(name, vae=str(tmp_path / "vae"))
