"""Rewards and judges: DreamBench metrics (DINO, CLIP-I, CLIP-T), ALIGN scores and RPO's reward."""

from rewardbooth.rewards.base import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    FunctionReward,
    LambdaHarmonicReward,
    Reward,
    Subject,
    available_rewards,
    build_reward,
    harmonic_reward,
    register_reward,
    strip_identifier,
    unregister_reward,
)
from rewardbooth.rewards.encoders import (
    DEFAULT_ENCODER_MODELS,
    ENCODER_KINDS,
    ImageTextEncoder,
    clear_encoder_cache,
    load_encoder,
    park_encoders,
    parking_held,
    tiny_encoder_path,
)

__all__ = [
    "BUILTIN_REWARDS",
    "DEFAULT_ENCODER_MODELS",
    "ENCODER_KINDS",
    "ENTRY_POINT_GROUP",
    "FunctionReward",
    "ImageTextEncoder",
    "LambdaHarmonicReward",
    "Reward",
    "Subject",
    "available_rewards",
    "build_reward",
    "clear_encoder_cache",
    "harmonic_reward",
    "load_encoder",
    "park_encoders",
    "parking_held",
    "register_reward",
    "strip_identifier",
    "tiny_encoder_path",
    "unregister_reward",
]
