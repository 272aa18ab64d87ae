"""DPG's critics Q_phi, the critic kinds (strategies), and the replay of recent (critic input, reward) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewardbooth import diffusion

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.


def _activation(name: str) -> nn.Module:
    # Leaky units keep a gradient when pre-activations go negative: with plain ReLU and SGD 0.01
    # the released critic can die and silently stop supervising the actor.
    return nn.LeakyReLU(0.01) if name == "leaky_relu" else nn.ReLU()


class ReconstructionCritic(nn.Module):
    """Q(R) for the residual R = (x0_hat - x0_ref)^2, predicting the cost MSE(x0_hat, x0_ref).

    The released code's shape (conv 4->1, flatten, MLP) sized to the latent, with its
    non-negative initialisation, so Q starts as an increasing function of the residual.
    """

    def __init__(self, latent_channels: int, latent_size: int, hidden: int = 64, activation: str = "leaky_relu"):
        super().__init__()
        self.conv = nn.Conv2d(latent_channels, 1, 3, padding=1)
        self.fc1 = nn.Linear(latent_size * latent_size, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.act_conv, self.act_hidden = nn.LeakyReLU(0.01), _activation(activation)
        with torch.no_grad():
            for layer in (self.conv, self.fc1, self.fc2):
                fan_in = layer.weight[0].numel()
                layer.weight.uniform_(0.0, 1.0 / fan_in)
                layer.bias.uniform_(0.0, 1.0 / fan_in)
        self.last_hidden: torch.Tensor | None = None

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        h = self.act_conv(self.conv(residual)).flatten(1)
        pre = self.fc1(h)
        self.last_hidden = pre.detach()
        return self.fc2(self.act_hidden(pre)).squeeze(-1)


class ConditionedCritic(nn.Module):
    """Q(x, t, c): an image branch over x, a timestep embedding and the mean text embedding, then an MLP."""

    def __init__(self, image: nn.Module, text_dim: int, hidden: int = 64, activation: str = "leaky_relu"):
        super().__init__()
        self.image = image  # x -> (B, 64)
        self.time = nn.Linear(32, 64)
        self.text = nn.Linear(text_dim, 64)
        self.fc1 = nn.Linear(64 * 3, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.act_hidden = _activation(activation)
        self.last_hidden: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        t = self.time(get_timestep_embedding(timesteps, 32).to(x.dtype))
        pre = self.fc1(torch.cat([self.image(x), t, self.text(text.mean(1))], dim=1))
        self.last_hidden = pre.detach()
        return self.fc2(self.act_hidden(pre)).squeeze(-1)


class RewardCritic(ConditionedCritic):
    """Q(x0_hat, t, c): the reward of the decoded look-forward image, from latent, timestep and text."""

    def __init__(self, latent_channels: int, text_dim: int, hidden: int = 64, activation: str = "leaky_relu"):
        image = nn.Sequential(
            nn.Conv2d(latent_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        super().__init__(image, text_dim, hidden, activation)


class FeatureCritic(ConditionedCritic):
    """Q(f, t, c) over the reward encoder's features f of the decoded look-forward image: the
    reward is a function of f, so the critic can fit it; its gradient reaches x0_hat through f."""

    def __init__(self, feature_dim: int, text_dim: int, hidden: int = 64, activation: str = "leaky_relu"):
        super().__init__(nn.Linear(feature_dim, 64), text_dim, hidden, activation)


def live_fraction(critic: nn.Module) -> torch.Tensor:
    """Share of hidden units active (positive) for some sample of the last batch; 0 = dead critic.

    A tensor on the critic's device, so logging it costs no host sync.
    """
    return (critic.last_hidden > 0).any(0).float().mean()


class Replay:
    """A ring of recent critic inputs and their true rewards; sampling always includes the newest."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []
        self.next = 0

    def add(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> int:
        """Add a batch row by row; returns how many rows were added."""
        for i in range(targets.shape[0]):
            item = (tuple(x[i].detach() for x in inputs), targets[i].detach())
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                self.items[self.next] = item
            self.next = (self.next + 1) % self.capacity
        return targets.shape[0]

    def sample(self, count: int, newest: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        n = len(self.items)
        recent = [(self.next - 1 - i) % n if n == self.capacity else n - 1 - i for i in range(min(newest, n))]
        others = [i for i in torch.randperm(n, generator=generator).tolist() if i not in recent][: max(count - len(recent), 0)]
        chosen = [self.items[i] for i in recent + others]
        inputs = tuple(torch.stack(parts) for parts in zip(*(item[0] for item in chosen)))
        return inputs, torch.stack([item[1] for item in chosen])

    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The ring as stacked tensors (for safetensors), in ring order."""
        state = {f"{prefix}next": torch.tensor(self.next)}
        if self.items:
            for k, parts in enumerate(zip(*(item[0] for item in self.items))):
                state[f"{prefix}input_{k}"] = torch.stack(parts).contiguous()
            state[f"{prefix}target"] = torch.stack([item[1] for item in self.items]).contiguous()
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        self.next = int(state[f"{prefix}next"])
        inputs = [state[f"{prefix}input_{k}"] for k in range(sum(key.startswith(f"{prefix}input_") for key in state))]
        targets = state.get(f"{prefix}target")
        self.items = [] if targets is None else [(tuple(x[i] for x in inputs), targets[i]) for i in range(targets.shape[0])]


def critic_regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())


# --- critic kinds: what Q sees, what it regresses to, what the actor minimises ------------------


class ReconstructionKind:
    """The released code's critic: Q(R) over R = (x0_hat - x0_ref)^2 predicts the cost MSE(x0_hat, x0_ref)."""

    needs_image = False

    def build(self, latent_channels: int, latent_size: int, text_dim: int, feature_dim: int | None, cfg) -> nn.Module:
        return ReconstructionCritic(latent_channels, latent_size, cfg.critic_hidden, cfg.critic_activation)

    def inputs(self, judged, x0_ref, timesteps, text, features) -> tuple[torch.Tensor, ...]:
        return ((judged - x0_ref) ** 2,)

    @torch.no_grad()
    def target(self, judged, x0_ref, images, judge) -> torch.Tensor:
        return diffusion.per_sample_mse(judged, x0_ref)

    def cost(self, q: torch.Tensor) -> torch.Tensor:
        return q  # a predicted cost: minimised as it is

    def as_reward(self, value: torch.Tensor) -> torch.Tensor:
        return -value  # logged as a reward (higher is better)


class LatentRewardKind:
    """The paper's reward critic: Q(x0_hat, t, c) predicts the reward of the decoded look-forward image."""

    needs_image = False

    def build(self, latent_channels: int, latent_size: int, text_dim: int, feature_dim: int | None, cfg) -> nn.Module:
        return RewardCritic(latent_channels, text_dim, cfg.critic_hidden, cfg.critic_activation)

    def inputs(self, judged, x0_ref, timesteps, text, features) -> tuple[torch.Tensor, ...]:
        return (judged, timesteps, text)

    @torch.no_grad()
    def target(self, judged, x0_ref, images, judge) -> torch.Tensor:
        return judge(images if images is not None else judge.decode(judged)).detach()

    def cost(self, q: torch.Tensor) -> torch.Tensor:
        return -q

    def as_reward(self, value: torch.Tensor) -> torch.Tensor:
        return value


class FeatureRewardKind(LatentRewardKind):
    """Q(f, t, c) over the reward encoder's features f of the decoded look-forward image."""

    needs_image = True

    def build(self, latent_channels: int, latent_size: int, text_dim: int, feature_dim: int | None, cfg) -> nn.Module:
        return FeatureCritic(feature_dim, text_dim, cfg.critic_hidden, cfg.critic_activation)

    def inputs(self, judged, x0_ref, timesteps, text, features) -> tuple[torch.Tensor, ...]:
        return (features, timesteps, text)


def critic_kind(reward: str, critic_input: str):
    """dpg.reward=recon: the reconstruction critic; a reward with dpg.critic_input=latent|features: a reward critic."""
    if reward == "recon":
        return ReconstructionKind()
    return FeatureRewardKind() if critic_input == "features" else LatentRewardKind()
