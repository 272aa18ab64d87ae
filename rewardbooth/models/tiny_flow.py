"""Flow-matching transformer presets (FLUX.1, SD3, FLUX.2) with seeded random weights.

Like the U-Net presets in `tiny.py`: the `tiny-*` pipelines are written once to the cache with
`save_pretrained` and loaded back with `from_pretrained`, so every flow-matching code path runs
offline on a CPU. `flux-random` and `sd35-random` carry FLUX.1-dev's and SD3.5 Large's real
component sizes; they are meant to be built on the meta device (`flow_configs` +
`build_flow_component`), never written to disk here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardbooth.models.tiny import _byte_level_vocab, cache_root, clip_text_config, save_once, vae_config

# diffusers / transformers / tokenizers are imported inside the functions that use them (start-up cost).

# Bump when an architecture, a tokenizer or the seed changes, so stale caches are rebuilt.
FLOW_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FlowPreset:
    name: str
    family: str  # "flux" (FLUX.1), "sd3" (SD3 / SD3.5) or "flux2" (FLUX.2)
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
    # FLUX.2-dev's classes at toy sizes: a Mistral 3 text encoder (read at layers 10, 20, 30, so 30 thin
    # layers) and a plain chat-template tokenizer in place of its PixtralProcessor (see _mistral_tokenizer).
    "tiny-flux2": FlowPreset("tiny-flux2", "flux2", "tiny-flux2"),
    # Real layer sizes, for the meta device only: FLUX.1-dev (12B transformer + T5-XXL) and SD3.5 Large (8B).
    "flux-random": FlowPreset("flux-random", "flux", "flux1-dev"),
    "sd35-random": FlowPreset("sd35-random", "sd3", "sd35-large"),
}

# Text encoder sizes. CLIP in tiny.py's keys (clip_text_config); T5 and Mistral as their config keyword arguments.
_CLIP_TINY = dict(text_hidden=32, text_ffn=64, text_layers=2, text_heads=4)
_CLIP_L = dict(text_hidden=768, text_ffn=3072, text_layers=12, text_heads=12, vocab_size=49408)
_CLIP_BIGG = dict(text_hidden=1280, text_ffn=5120, text_layers=32, text_heads=20, vocab_size=49408, text_act="gelu")
_T5_TINY = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24, vocab_size=32128)
# VAE sizes in tiny.py's keys (vae_config). Four levels, as the real ones: 8x down-sampling.
_VAE_TINY = dict(vae_channels=(32, 32, 32, 32), vae_layers=1, vae_size=64)
_VAE_REAL = dict(vae_channels=(128, 256, 512, 512), vae_layers=2, vae_size=1024)
# Mistral3ForConditionalGeneration: MistralConfig and PixtralVisionConfig keyword arguments. FLUX.2 stacks the
# text model's hidden states 10, 20 and 30, so it needs 30 layers; the vision tower is unused for text prompts.
_MISTRAL3_TINY = dict(
    text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1,
              head_dim=8, max_position_embeddings=1024, sliding_window=None),
    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                image_size=64, patch_size=16))

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
    "tiny-flux2": dict(
        transformer=dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
        vae=_VAE_TINY, encoders=(_MISTRAL3_TINY,)),
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
    "flux2": dict(pipeline="Flux2Pipeline", transformer="Flux2Transformer2DModel",
                  vae=dict(_class_name="AutoencoderKLFlux2", latent_channels=32, scaling_factor=None, batch_norm_eps=1e-4,
                           batch_norm_momentum=0.1, patch_size=(2, 2)),
                  encoders=(("text_encoder", "Mistral3ForConditionalGeneration"),),
                  scheduler=_FLUX_SCHEDULER),
}


def flow_configs(name: str) -> dict[str, dict]:
    """The config dicts of a preset's weighted components and scheduler, keyed by pipeline component name.

    Diffusers configs carry `_class_name`, transformers configs `architectures` (as their
    config.json files do); `build_flow_component` turns one into a module with random weights,
    e.g. under `torch.device("meta")` for the real-size presets."""
    preset = FLOW_PRESETS[name]
    family, shape = FAMILIES[preset.family], FLOW_SHAPES[preset.shape]
    configs = {"transformer": {"_class_name": family["transformer"], **shape["transformer"]}}
    vae = {**vae_config(shape["vae"], family["vae"]["scaling_factor"]), **family["vae"]}
    configs["vae"] = {key: value for key, value in vae.items() if value is not None}
    for (component, class_name), size in zip(family["encoders"], shape["encoders"], strict=True):
        configs[component] = {**_text_config(class_name, size), "architectures": [class_name]}
    configs["scheduler"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", **family["scheduler"]}
    return configs


def _text_config(class_name: str, size: dict) -> dict:
    if class_name.startswith("CLIP"):
        return clip_text_config(size, _byte_level_vocab()).to_dict()
    if class_name.startswith("Mistral3"):
        return _mistral3_config(size)
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


def _mistral3_config(size: dict) -> dict:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    vocab = _mistral_vocab()
    text = MistralConfig(vocab_size=len(vocab), bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], tie_word_embeddings=False, **size["text"])
    return Mistral3Config(text_config=text, vision_config=PixtralVisionConfig(**size["vision"]),
                          image_token_index=vocab["[IMG]"], tie_word_embeddings=False).to_dict()


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
    for component, config in configs.items():
        if component.startswith("text_encoder"):
            components[component.replace("text_encoder", "tokenizer")] = _tokenizer(config["architectures"][0])
    return getattr(diffusers, FAMILIES[preset.family]["pipeline"])(**components)


def _tokenizer(encoder_class: str):
    """A tokenizer made offline for a text encoder class."""
    if encoder_class.startswith("CLIP"):
        from transformers import CLIPTokenizer

        return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)
    if encoder_class.startswith("Mistral3"):
        return _mistral_tokenizer()
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)


def _t5_vocab() -> list[tuple[str, float]]:
    """A character-level SentencePiece-style unigram vocabulary: T5's pad/eos/unk, the word-start
    mark, and every printable ASCII character alone and after the mark. Scores favour the
    word-start pieces, so "a cat" splits as ["▁a", "▁c", "a", "t"]; other characters map to <unk>."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    return specials + [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]


# Mistral's control tokens, then the 256 byte-level characters (no merges: one token per byte).
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[IMG]", "[IMG_BREAK]", "[IMG_END]")
# Mistral Small 3's prompt layout; message contents may be strings or lists of {"type": "text", "text": ...}.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _mistral_vocab() -> dict[str, int]:
    tokens = [*_MISTRAL_SPECIALS, *list(_byte_level_vocab())[:256]]
    return {token: i for i, token in enumerate(tokens)}


def _mistral_tokenizer():
    """A byte-level BPE tokenizer with Mistral's control tokens and chat template.

    FLUX.2-dev's own tokenizer component is a PixtralProcessor (tokenizer + image processor), which
    needs torchvision; Flux2Pipeline only calls its `apply_chat_template` for text prompts, which a
    plain tokenizer with a chat template provides."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_mistral_vocab(), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_MISTRAL_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512, chat_template=_MISTRAL_CHAT_TEMPLATE)


def flow_model_path(name: str) -> Path:
    """Return a from_pretrained folder for a tiny flow preset, building it on first use."""
    preset = FLOW_PRESETS[name]
    if not preset.tiny:
        raise ValueError(f"{name} has real layer sizes (tens of GB): build it on the meta device from flow_configs({name!r})")
    folder = cache_root() / "models" / f"{name}-v{FLOW_FORMAT_VERSION}"
    return save_once(folder, lambda: build_flow_pipeline(name), {"preset": name, "version": FLOW_FORMAT_VERSION})
