"""Flow-matching transformer presets (FLUX.1, SD3, FLUX.2 [klein], Z-Image, Qwen-Image) with seeded random weights.

Like the U-Net presets in `tiny.py`: the `tiny-*` pipelines are written once to the cache with
`save_pretrained` and loaded back with `from_pretrained`, so every flow-matching code path runs
offline on a CPU. `flux-random`, `sd35-random`, `flux2-klein-random` / `flux2-klein-9b-random`, `zimage-random` and
`qwenimage-random` carry FLUX.1-dev's, SD3.5 Large's, FLUX.2 [klein] base 4B's / 9B's, Z-Image's (Turbo and base: one
architecture) and Qwen-Image's real component sizes; they are meant to be built on the meta device (`flow_configs` + `build_flow_component`), never written to
disk here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardbooth.models.tiny import _byte_level_vocab, cache_root, clip_text_config, save_once, vae_config

# diffusers / transformers / tokenizers are imported inside the functions that use them (start-up cost).

# Bump when an architecture, a tokenizer or the seed changes, so stale caches are rebuilt.
FLOW_FORMAT_VERSION = 3


@dataclass(frozen=True)
class FlowPreset:
    name: str
    family: str  # "flux" (FLUX.1), "sd3" (SD3 / SD3.5), "flux2" (FLUX.2 [klein]), "zimage" (Z-Image), "qwenimage" (Qwen-Image)
    shape: str  # a key of FLOW_SHAPES
    seed: int = 0

    @property
    def tiny(self) -> bool:
        return self.shape.startswith("tiny")


FLOW_PRESETS = {
    # FLUX.1-dev's classes at toy sizes, guidance-distilled (guidance_embeds) like dev.
    "tiny-flux": FlowPreset("tiny-flux", "flux", "tiny-flux"),
    # SD3.5's classes at toy sizes: two CLIP encoders with projections and a T5 encoder.
    "tiny-sd3": FlowPreset("tiny-sd3", "sd3", "tiny-sd3"),
    # FLUX.2 [klein] base's classes at toy sizes: a Qwen3 text encoder (read at layers 9, 18, 27, so 27
    # thin layers), the 32-channel batch-normalised VAE, no guidance embedding (base klein uses real CFG).
    "tiny-flux2": FlowPreset("tiny-flux2", "flux2", "tiny-flux2"),
    # Z-Image-Turbo's classes at toy sizes: the single-stream transformer with its refiners, a Qwen3 text encoder
    # (read at its second-to-last layer), FLUX.1's VAE, Turbo's fixed scheduler shift 3 (base: 6).
    "tiny-zimage": FlowPreset("tiny-zimage", "zimage", "tiny-zimage"),
    # Qwen-Image's classes at toy sizes: the double-stream MMDiT over 2x2-packed latents, a Qwen2.5-VL text encoder (its
    # last hidden state; the vision tower is built but never called) and the video VAE with its frame axis and per-channel
    # latent statistics (the real ones, so a missing (de)normalisation shows).
    "tiny-qwenimage": FlowPreset("tiny-qwenimage", "qwenimage", "tiny-qwenimage"),
    # Real layer sizes, for the meta device only: FLUX.1-dev (12B transformer + T5-XXL), SD3.5 Large (8B) and Medium (2.5B),
    # FLUX.2 [klein] base 4B (Qwen3-4B) and 9B (Qwen3-8B), Z-Image 6B (Qwen3-4B), Qwen-Image 20B (Qwen2.5-VL 7B).
    "flux-random": FlowPreset("flux-random", "flux", "flux1-dev"),
    "sd35-random": FlowPreset("sd35-random", "sd3", "sd35-large"),
    "sd35-medium-random": FlowPreset("sd35-medium-random", "sd3", "sd35-medium"),
    "flux2-klein-random": FlowPreset("flux2-klein-random", "flux2", "flux2-klein-4b"),
    "flux2-klein-9b-random": FlowPreset("flux2-klein-9b-random", "flux2", "flux2-klein-9b"),
    "zimage-random": FlowPreset("zimage-random", "zimage", "zimage-6b"),
    "qwenimage-random": FlowPreset("qwenimage-random", "qwenimage", "qwenimage-20b"),
}

# Text encoder sizes. CLIP in tiny.py's keys (clip_text_config); T5 as its config keyword arguments.
_CLIP_TINY = dict(text_hidden=32, text_ffn=64, text_layers=2, text_heads=4)
_CLIP_L = dict(text_hidden=768, text_ffn=3072, text_layers=12, text_heads=12, vocab_size=49408)
_CLIP_BIGG = dict(text_hidden=1280, text_ffn=5120, text_layers=32, text_heads=20, vocab_size=49408, text_act="gelu")
# Qwen3 (FLUX.2 [klein]'s text encoder) as Qwen3Config keyword arguments; the pipeline stacks hidden states 9, 18, 27.
_QWEN3_TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=8, max_position_embeddings=1024)
_QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, max_position_embeddings=40960, vocab_size=151936, tie_word_embeddings=True)
_QWEN3_8B = dict(_QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
_QWEN3_TINY_2 = dict(_QWEN3_TINY, num_hidden_layers=2)  # Z-Image reads one hidden state, the second-to-last
# Qwen2.5-VL (Qwen-Image's text encoder) as Qwen2_5_VLConfig's text and vision parts; its multimodal rotary sections
# split the head's half-width over (time, height, width). Real: Qwen2.5-VL-7B-Instruct.
_QWEN25VL_TINY = dict(text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=1024,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[1, 1, 2])),
                      vision=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                                  fullatt_block_indexes=[0]))
_QWEN25VL_7B = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, max_position_embeddings=128000, vocab_size=152064, bos_token_id=151643,
                              eos_token_id=151645,
                              rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
                    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                fullatt_block_indexes=[7, 15, 23, 31]))
_T5_TINY = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24, vocab_size=32128)
# VAE sizes in tiny.py's keys (vae_config). Four levels, as the real ones: 8x down-sampling.
_VAE_TINY = dict(vae_channels=(32, 32, 32, 32), vae_layers=1, vae_size=64)
_VAE_REAL = dict(vae_channels=(128, 256, 512, 512), vae_layers=2, vae_size=1024)

# Per shape: transformer keyword arguments, VAE sizes, and one size dict per text encoder (in FAMILIES' order).
FLOW_SHAPES = {
    "tiny-flux": dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                         axes_dims_rope=(4, 4, 8)),
        vae=_VAE_TINY, encoders=(_CLIP_TINY, _T5_TINY)),
    "flux1-dev": dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                         axes_dims_rope=(16, 56, 56)),
        vae=_VAE_REAL, encoders=(_CLIP_L, _T5_XXL)),
    # The T5 is as wide as both CLIPs together, as SD3's (4096 >= 768 + 1280): the pipeline pads CLIP's states to it.
    "tiny-sd3": dict(
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                         out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm"),
        vae=_VAE_TINY, encoders=(_CLIP_TINY, _CLIP_TINY, {**_T5_TINY, "d_model": 64})),
    "sd35-large": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        vae=_VAE_REAL, encoders=(_CLIP_L, _CLIP_BIGG, _T5_XXL)),
    # SD3.5 Medium: SD3.5 Large's encoders and VAE with a 2.5B MMDiT-X (dual attention in blocks 0-12).
    "sd35-medium": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
        vae=_VAE_REAL, encoders=(_CLIP_L, _CLIP_BIGG, _T5_XXL)),
    # FLUX.2 [klein]: the text embedding is three Qwen3 hidden states side by side (joint_attention_dim = 3 x width).
    "tiny-flux2": dict(
        transformer=dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32, mlp_ratio=3.0,
                         axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        vae=_VAE_TINY, encoders=(_QWEN3_TINY,)),
    "flux2-klein-4b": dict(
        transformer=dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3 * 2560, timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
        vae=_VAE_REAL, encoders=(_QWEN3_4B,)),
    "flux2-klein-9b": dict(
        transformer=dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                         num_attention_heads=32, joint_attention_dim=3 * 4096, timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
        vae=_VAE_REAL, encoders=(_QWEN3_8B,)),
    # Z-Image: head width = sum(axes_dims); cap_feat_dim = the Qwen3 width; axes_lens[0] holds 512 caption tokens (and
    # the image tokens placed after them), as the real model's.
    "tiny-zimage": dict(
        transformer=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
                         n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
                         t_scale=1000.0, axes_dims=(8, 4, 4), axes_lens=(1536, 512, 512)),
        vae=_VAE_TINY, encoders=(_QWEN3_TINY_2,)),
    "zimage-6b": dict(
        transformer=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                         n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                         t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512)),
        vae=_VAE_REAL, encoders=(_QWEN3_4B,)),
    # Qwen-Image: head width = sum(axes_dims_rope); 2x2-packed 16-channel latents in (64), 16 channels per patch position
    # out; joint_attention_dim = the Qwen2.5-VL width. Its VAE in AutoencoderKLQwenImage's own keys (8x: three spatial
    # downsamplings, two of them temporal too; a single frame goes through unchanged in time).
    "tiny-qwenimage": dict(
        transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]),
        encoders=(_QWEN25VL_TINY,)),
    "qwenimage-20b": dict(
        transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
        encoders=(_QWEN25VL_7B,)),
}

_FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)

# Per family: pipeline and transformer classes, the VAE's class and latent statistics (None: a field
# the class does not have), the text encoders (component name, class) and the scheduler's config.
# FLUX.1's and SD3's VAEs: AutoencoderKL with 16 latent channels and no quant convolutions.
_NO_QUANT_VAE = dict(_class_name="AutoencoderKL", latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
FAMILIES = {
    "flux": dict(pipeline="FluxPipeline", transformer="FluxTransformer2DModel",
                 vae=dict(_NO_QUANT_VAE, scaling_factor=0.3611, shift_factor=0.1159),
                 encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")),
                 scheduler=_FLUX_SCHEDULER),
    "sd3": dict(pipeline="StableDiffusion3Pipeline", transformer="SD3Transformer2DModel",
                vae=dict(_NO_QUANT_VAE, scaling_factor=1.5305, shift_factor=0.0609),
                encoders=(("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                          ("text_encoder_3", "T5EncoderModel")),
                scheduler=dict(num_train_timesteps=1000, shift=3.0)),
    # FLUX.2's VAE: 32 latent channels, patchified 2x2 and normalised by its own batch-norm statistics.
    "flux2": dict(pipeline="Flux2KleinPipeline", transformer="Flux2Transformer2DModel",
                  vae=dict(_class_name="AutoencoderKLFlux2", latent_channels=32, scaling_factor=None, batch_norm_eps=1e-4,
                           batch_norm_momentum=0.1, patch_size=(2, 2)),
                  encoders=(("text_encoder", "Qwen3ForCausalLM"),),
                  scheduler=_FLUX_SCHEDULER),
    # Z-Image: FLUX.1's VAE; Qwen3 loaded as Qwen3Model (no LM head), as Z-Image's model_index.json names it; the
    # scheduler as Z-Image-Turbo ships it (fixed shift 3, no resolution-dependent shift).
    "zimage": dict(pipeline="ZImagePipeline", transformer="ZImageTransformer2DModel",
                   vae=dict(_NO_QUANT_VAE, scaling_factor=0.3611, shift_factor=0.1159),
                   encoders=(("text_encoder", "Qwen3Model"),),
                   scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)),
    # Qwen-Image: its video VAE (the class's default latents_mean / latents_std are the real model's statistics); the
    # scheduler as Qwen/Qwen-Image ships it (FLUX.1's resolution-dependent shift up to 8192 tokens, max 0.9, sigmas
    # stretched to end at 0.02).
    "qwenimage": dict(pipeline="QwenImagePipeline", transformer="QwenImageTransformer2DModel",
                      vae=dict(_class_name="AutoencoderKLQwenImage"),
                      encoders=(("text_encoder", "Qwen2_5_VLForConditionalGeneration"),),
                      scheduler=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                     base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                     time_shift_type="exponential")),
}


def flow_configs(name: str) -> dict[str, dict]:
    """The config dicts of a preset's weighted components and scheduler, keyed by pipeline component name.

    Diffusers configs carry `_class_name`, transformers configs `architectures` (as their
    config.json files do); `build_flow_component` turns one into a module with random weights,
    e.g. under `torch.device("meta")` for the real-size presets."""
    preset = FLOW_PRESETS[name]
    family, shape = FAMILIES[preset.family], FLOW_SHAPES[preset.shape]
    configs = {"transformer": {"_class_name": family["transformer"], **shape["transformer"]}}
    if family["vae"]["_class_name"] == "AutoencoderKLQwenImage":  # a video VAE: its own keys, no AutoencoderKL layout
        vae = {**family["vae"], **shape["vae"]}
    else:
        vae = {**vae_config(shape["vae"], family["vae"]["scaling_factor"]), **family["vae"]}
    configs["vae"] = {key: value for key, value in vae.items() if value is not None}
    for (component, class_name), size in zip(family["encoders"], shape["encoders"], strict=True):
        configs[component] = {**_text_config(class_name, size), "architectures": [class_name]}
    configs["scheduler"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", **family["scheduler"]}
    return configs


def _text_config(class_name: str, size: dict) -> dict:
    if class_name.startswith("CLIP"):
        return clip_text_config(size, _byte_level_vocab()).to_dict()
    if class_name.startswith("Qwen2_5_VL"):
        from transformers import Qwen2_5_VLConfig

        vocab = _qwen_vocab()  # tiny: the tokenizer's vocabulary (its prompt-template words too) and its <|endoftext|>,
        # <|im_end|>; real: Qwen's
        text = {"vocab_size": len(vocab) + len(_QWEN_IMAGE_WORDS), "bos_token_id": vocab["<|endoftext|>"], "eos_token_id": vocab["<|im_end|>"], **size["text"]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=size["vision"], tie_word_embeddings=False).to_dict()
    if class_name.startswith("Qwen3"):
        from transformers import Qwen3Config

        return Qwen3Config(**{"vocab_size": len(_qwen_vocab()), **size}).to_dict()
    from transformers import T5Config

    return T5Config(
        **{"vocab_size": len(_t5_vocab()), **size},  # tiny: the tokenizer's vocabulary; real: T5's 32128 rows
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX and SD3 use
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ).to_dict()


def build_flow_component(config: dict):
    """A module (random weights) or scheduler from one `flow_configs` entry."""
    config = dict(config)
    class_name = config.pop("_class_name", None)
    if class_name is not None:
        import diffusers

        return getattr(diffusers, class_name).from_config(config)
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    return cls(cls.config_class.from_dict(config))


def build_flow_pipeline(name: str):
    """The preset's pipeline, built in memory with weights seeded by the preset (the caller's RNG is untouched)."""
    import diffusers

    preset = FLOW_PRESETS[name]
    configs = flow_configs(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        components = {component: build_flow_component(config) for component, config in configs.items()}
        batch_norm = getattr(components["vae"], "bn", None)
        if batch_norm is not None:  # FLUX.2's latent statistics: not the identity, so a missing (de)normalisation shows
            batch_norm.running_mean.normal_(0.0, 0.5)
            batch_norm.running_var.uniform_(0.5, 2.0)
    for component, config in configs.items():
        if component.startswith("text_encoder"):
            components[component.replace("text_encoder", "tokenizer")] = _tokenizer(config["architectures"][0])
    return getattr(diffusers, FAMILIES[preset.family]["pipeline"])(**components)


def _tokenizer(encoder_class: str):
    """A tokenizer made offline for a text encoder class."""
    if encoder_class.startswith("CLIP"):
        from transformers import CLIPTokenizer

        return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)
    if encoder_class.startswith("Qwen2_5_VL"):  # Qwen-Image's: text only, so no image processor (and no torchvision)
        return _qwen_tokenizer(_QWEN_IMAGE_WORDS)
    if encoder_class.startswith("Qwen3"):
        return _qwen_tokenizer()
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)


def _t5_vocab() -> list[tuple[str, float]]:
    """A character-level SentencePiece-style unigram vocabulary: T5's pad/eos/unk, the word-start
    mark, and every printable ASCII character alone and after the mark. Scores favour the
    word-start pieces, so "a cat" splits as ["▁a", "▁c", "a", "t"]; other characters map to <unk>."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    return specials + [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]


# Qwen's control tokens after the 256 byte-level characters (no merges: one token per byte).
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat layout, with its `enable_thinking=False` empty thinking block (as Flux2KleinPipeline asks for; ZImagePipeline
# asks for enable_thinking=True: no block).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_vocab() -> dict[str, int]:
    tokens = [*list(_byte_level_vocab())[:256], *_QWEN_SPECIALS]
    return {token: i for i, token in enumerate(tokens)}


# Qwen-Image's prompt template begins with a system prompt that QwenImagePipeline drops by count: its first 34 tokens
# (prompt_template_encode_start_idx) in Qwen's tokenizer. Its words, whole, as tokens of the Qwen-Image preset's tokenizer,
# so that the same 34 tokens are the whole prefix there too, as Qwen's BPE splits it ("system", " the", ",", ...).
_QWEN_IMAGE_WORDS = ("system", "user", "Describe", " the", " image", " by", " detailing", " color", ",", " shape", " size",
                     " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background", ":")


def _qwen_tokenizer(words: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with Qwen's control tokens and chat template, in Qwen2TokenizerFast
    (the class FLUX.2 [klein]'s pipeline names; Z-Image's and Qwen-Image's name its slow twin)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE(vocab=_qwen_vocab(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_QWEN_SPECIALS))
    backend.add_tokens([AddedToken(word, normalized=False) for word in words])
    return Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              model_max_length=512, chat_template=_QWEN_CHAT_TEMPLATE)


def flow_model_path(name: str) -> Path:
    """Return a from_pretrained folder for a tiny flow preset, building it on first use."""
    preset = FLOW_PRESETS[name]
    if not preset.tiny:
        raise ValueError(f"{name} has real layer sizes (tens of GB): build it on the meta device from flow_configs({name!r})")
    folder = cache_root() / "models" / f"{name}-v{FLOW_FORMAT_VERSION}"
    return save_once(folder, lambda: build_flow_pipeline(name), {"preset": name, "version": FLOW_FORMAT_VERSION})
