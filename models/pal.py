"""Torch PAL heads (trained on frozen embeddings) and the per-user mixture weights.

Parameter names follow one scheme (`f.w0`, `f.b0`, ..., `g.w0` ...) with weights stored (in, out) so that
`models.head` can evaluate the same head in numpy from the same safetensors file, without torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import PALConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation: its derivative has a closed form that models.head mirrors in numpy.
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """x @ w0 + b0 -> gelu -> ... -> x @ wL + bL, weights stored (in, out)."""

    def __init__(self, dims: list[int], generator: torch.Generator) -> None:
        super().__init__()
        self.n_layers = len(dims) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            w = torch.randn(d_in, d_out, generator=generator) * math.sqrt(1.0 / d_in)
            self.register_parameter(f"w{i}", nn.Parameter(w))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_layers):
            x = x @ getattr(self, f"w{i}") + getattr(self, f"b{i}")
            if i < self.n_layers - 1:
                x = gelu(x)
        return x


class StackedMLP(nn.Module):
    """K independent MLPs evaluated in one batched einsum: (B, in) -> (B, K, out)."""

    def __init__(self, k: int, dims: list[int], generator: torch.Generator) -> None:
        super().__init__()
        self.n_layers = len(dims) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            w = torch.randn(k, d_in, d_out, generator=generator) * math.sqrt(1.0 / d_in)
            self.register_parameter(f"w{i}", nn.Parameter(w))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(k, d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,kio->bko", x, self.w0) + self.b0
        for i in range(1, self.n_layers):
            h = torch.einsum("bki,kio->bko", gelu(h), getattr(self, f"w{i}")) + getattr(self, f"b{i}")
        return h


def _dims(d_in: int, cfg: PALConfig) -> list[int]:
    return [d_in] + [cfg.hidden_dim] * cfg.n_hidden + [cfg.latent_dim]


class PALHead(nn.Module):
    """The shared (user-independent) part of a PAL model."""

    def __init__(self, cfg: PALConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        self.f = MLP(_dims(cfg.item_dim, cfg), gen)
        if cfg.form == "B":
            self.g = StackedMLP(cfg.k, _dims(cfg.prompt_dim, cfg), gen)
            self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)))
        else:
            self.prototypes = nn.Parameter(
                torch.randn(cfg.k, cfg.item_dim, generator=gen) / math.sqrt(cfg.item_dim)
            )

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(max=self.cfg.tau_max)

    def latent(self, item: torch.Tensor) -> torch.Tensor:
        """f(e(x)) for PAL-B, f(e(p, x)) for PAL-A: (B, item_dim) -> (B, D)."""
        return self.f(item)

    def prompt_prototypes(self, prompt: torch.Tensor) -> torch.Tensor:
        """PAL-B only: g_k(e(p)) for every k: (B, prompt_dim) -> (B, K, D)."""
        return self.g(prompt)

    def ideal_points(self, weights: torch.Tensor) -> torch.Tensor:
        """PAL-A only: f(sum_k w_k p_k): (N, K) -> (N, D)."""
        return self.f(weights @ self.prototypes)

    def reward(self, prompt: torch.Tensor, item: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reward of each item for the user mixture on the same row: (B,), weights (B, K) on the simplex."""
        z = self.latent(item)
        if self.cfg.form == "B":
            mix = torch.einsum("bk,bkd->bd", weights, self.prompt_prototypes(prompt))
            return self.tau * F.cosine_similarity(z, mix, dim=-1, eps=1e-8)
        return -((z - self.ideal_points(weights)) ** 2).sum(-1)


class PALModel(nn.Module):
    """Shared head plus one row of simplex logits per seen user."""

    def __init__(self, cfg: PALConfig, n_users: int, seed: int = 0) -> None:
        super().__init__()
        self.head = PALHead(cfg, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        # Small random logits break the symmetry between prototypes from the first step.
        self.user_logits = nn.Parameter(0.1 * torch.randn(n_users, cfg.k, generator=gen))

    def user_weights(self, user_idx: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.user_logits if user_idx is None else self.user_logits[user_idx]
        return torch.softmax(logits, dim=-1)

    def margin(
        self, prompt: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, user_idx: torch.Tensor
    ) -> torch.Tensor:
        """r(chosen) - r(rejected) per comparison; positive means the model agrees with the label."""
        w = self.user_weights(user_idx)
        return self.head.reward(prompt, chosen, w) - self.head.reward(prompt, rejected, w)


def preference_loss(margin: torch.Tensor, kind: str = "logistic", hinge_margin: float = 1.0) -> torch.Tensor:
    """Bradley-Terry-Luce logistic loss by default; hinge optional."""
    if kind == "logistic":
        return F.softplus(-margin).mean()
    if kind == "hinge":
        return F.relu(hinge_margin - margin).mean()
    raise ValueError(f"unknown loss {kind!r}: expected 'logistic' or 'hinge'")


def head_state(head: PALHead) -> dict[str, torch.Tensor]:
    """Parameters under the shared naming scheme, plus the effective (clamped) tau."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if head.cfg.form == "B":
        state["tau"] = head.tau.detach().reshape(1).cpu()
    return state
