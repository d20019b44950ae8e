"""The predictor network: features -> P(safe) at every grid level, non-increasing by construction.

Owns `SafetyNet`, a plain `nn.Module` (no Lightning import) holding its own feature
normalisation as buffers, so exported weights carry it. Level 0 (dense) is safe by definition;
for the K sparse levels the logits are z_1, z_1 - g_2, z_1 - g_2 - g_3, ... with g_k = softplus(.)
>= 0, hence P(safe) never increases with the level. Imports torch only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SafetyNet(nn.Module):
    def __init__(self, n_features: int, n_sparse_levels: int, hidden: int = 64, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_sparse_levels)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] (raw) -> logits [B, K] of P(safe) at the K sparse levels, non-increasing."""
        raw = self.head(self.body((features - self.feature_mean) / self.feature_std))
        first, gaps = raw[:, :1], F.softplus(raw[:, 1:])
        return torch.cat([first, first - gaps.cumsum(dim=1)], dim=1)

    @torch.no_grad()
    def safe_probability(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K]: P(safe) at every grid level, 1 at level 0."""
        p = torch.sigmoid(self(features))
        return torch.cat([torch.ones_like(p[:, :1]), p], dim=1)
