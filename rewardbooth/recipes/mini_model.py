"""MiniBench's base model: a Stable-Diffusion-shaped pipeline sized for the mini world.

`build_mini_pipeline(config)` returns an untrained `StableDiffusionPipeline` made of the
same diffusers/transformers classes as a real SD 1.x checkpoint (AutoencoderKL,
UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDPMScheduler), so once
`rewardbooth.recipes.mini_pretrain` has trained it and written it with `save_pretrained`, every
method loads it with `rewardbooth.models.loading.load_components(folder)` unchanged.

Design (measured choices are in docs/minibench-plan.md):

- Images are 32 px. The VAE has two encoder blocks (one downsampling), 4 latent channels,
  so latents are 4 x 16 x 16 like SD's 8x-downsampled latents are 4 x 64 x 64. A random
  VAE destroys images, so the pretraining script trains it first as an autoencoder
  (a few hundred steps suffice on this world) and then sets `scaling_factor` to
  1 / std(latents), exactly the role 0.18215 plays in SD.
- The tokenizer is a CLIPTokenizer whose vocabulary is CLIP's 512 byte-level symbols plus
  one whole-word token for every word the world's captions use and for the usual
  DreamBooth identifiers ("sks" ...). The merges file builds each such word from its
  characters, so a world word is one token and anything else still tokenizes (into
  characters): byte fallback. Whole-word tokens make the text encoder's job a lookup
  rather than spelling, which a tiny encoder trained for minutes needs.
- `model_max_length` is 16 (the longest caption plus identifier is 13 tokens with BOS/EOS):
  cross-attention over 16 rather than 77 positions is cheaper and nothing is truncated.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rewardbooth.mini.world import COLOURS, CONTEXT_PHRASES, PATTERNS, SHAPES, SIZES
from rewardbooth.models.tiny import _byte_level_vocab, assemble_pipeline

# diffusers / transformers are imported inside the functions that use them, so --help answers at once.

# Identifiers DreamBooth-style methods use for a subject; each is one token (untrained in
# pretraining, like a rare token in a real vocabulary).
IDENTIFIER_TOKENS: tuple[str, ...] = ("sks", "zwx", "ohwx", "xjy", "qlv", "vkt")


def world_words() -> tuple[str, ...]:
    """Every word a mini-world caption or evaluation prompt can contain."""

    words = set(SHAPES) | set(COLOURS) | set(PATTERNS) | set(SIZES) | {"a", "an", "upside", "down", "photo", "of"}
    for phrase in CONTEXT_PHRASES.values():
        words |= set(phrase.split())
    words |= {"plain", "beach", "snow", "grass", "city", "night", "desert", "forest"}
    return tuple(sorted(words))


def word_vocab_and_merges(extra_words: tuple[str, ...] = IDENTIFIER_TOKENS) -> tuple[dict[str, int], list[str]]:
    """Byte-level CLIP vocabulary plus whole-word tokens, and merges that build those words.

    Each word w = c1..cn gets a left-to-right merge chain (c1 c2), (c1c2 c3), ... ending in
    the end-of-word form "w</w>"; `check_word_tokens` verifies the outcome with the real
    tokenizer.
    """
    vocab = _byte_level_vocab()
    specials = {t: vocab.pop(t) for t in ("<|startoftext|>", "<|endoftext|>")}
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(left: str, right: str) -> None:
        if (left, right) not in ranks:
            ranks[(left, right)] = len(merges)
            merges.append(f"{left} {right}")
        if left + right not in vocab:
            vocab[left + right] = len(vocab)

    words = [w for w in sorted(set(world_words()) | set(extra_words)) if len(w) > 1]  # "a" is the byte token "a</w>"
    # Another word's merge can fire inside a word before its own chain does ("ri" of "ring"
    # inside "striped"); then chain on from the pieces BPE actually reached, until every
    # word ends as one symbol (a fixed point, reached in a few rounds).
    for _ in range(20):
        done = True
        for word in words:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) > 1:
                done = False
                left = pieces[0]
                for right in pieces[1:]:
                    add(left, right)
                    left = left + right
        if done:
            break
    else:
        raise RuntimeError("could not build a merges list that keeps every world word whole")
    for name in specials:
        vocab[name] = len(vocab)
    return vocab, merges


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = merges_pair = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == rank)
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == merges_pair:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def check_word_tokens(tokenizer, words: tuple[str, ...] | None = None) -> list[str]:
    """World words that do NOT come out as a single token (should be empty)."""
    words = words if words is not None else world_words() + IDENTIFIER_TOKENS
    bad = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            bad.append(word)
    return bad


@dataclass
class MiniModelConfig:
    """Sizes of the mini pipeline. The presets below are the measured candidates."""

    image_size: int = 32
    # U-Net
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 1
    head_dim: int = 8
    cross_attn_blocks: int | None = None  # down blocks with cross-attention; None: all but the last
    # VAE: len(vae_channels) - 1 downsamplings (2 blocks: 32 px -> 16 x 16 latents)
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers: int = 1
    latent_channels: int = 4
    scaling_factor: float = 1.0  # replaced by 1 / std(latents) after the VAE is trained
    # text encoder
    text_hidden: int = 64
    text_ffn: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    prediction_type: str = "epsilon"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


MINI_PRESETS: dict[str, MiniModelConfig] = {
    # ~0.9 M U-Net: for tests and the smallest CPU runs.
    "xs": MiniModelConfig(unet_channels=(32, 64), unet_layers=1, text_hidden=32, text_ffn=64, vae_channels=(32, 32)),
    # ~3.5 M U-Net
    "s": MiniModelConfig(unet_channels=(64, 128), unet_layers=1),
    # ~8 M U-Net (three levels: 16, 8, 4 latent px)
    "m": MiniModelConfig(unet_channels=(64, 128, 128), unet_layers=2),
}


def build_tokenizer(config: MiniModelConfig):
    vocab, merges = word_vocab_and_merges()
    return _clip_tokenizer_from_lists(vocab, merges, config.max_length)


def _clip_tokenizer_from_lists(vocab: dict[str, int], merges: list[str], max_length: int):
    """CLIPTokenizer wants files; write them to a temporary folder."""

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)


def build_mini_pipeline(config: MiniModelConfig | None = None):
    """An untrained mini StableDiffusionPipeline with seeded weights."""
    config = config or MiniModelConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build(config)


def _build(config: MiniModelConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_factor = 2 ** (len(config.vae_channels) - 1)
    if config.image_size % vae_factor:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the VAE factor {vae_factor}")
    depth = len(config.unet_channels)
    n_cross = depth - 1 if config.cross_attn_blocks is None else config.cross_attn_blocks
    if depth == 1:
        n_cross = 1
    down = ("CrossAttnDownBlock2D",) * n_cross + ("DownBlock2D",) * (depth - n_cross)
    up = tuple(reversed([b.replace("Down", "Up") for b in down]))
    groups = min(32, *config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.image_size // vae_factor,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.head_dim,
        norm_num_groups=groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        latent_channels=config.latent_channels,
        layers_per_block=config.vae_layers,
        norm_num_groups=min(32, *config.vae_channels),
        sample_size=config.image_size,
        scaling_factor=config.scaling_factor,
    )
    vocab, merges = word_vocab_and_merges()
    tokenizer = _clip_tokenizer_from_lists(vocab, merges, config.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=config.text_hidden,
            intermediate_size=config.text_ffn,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer, config.prediction_type)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
