"""A tiny TorchScript-able classifier for the model factory (imports torch: import it lazily).

It lives in its own module because ``torch.jit.script`` compiles from source, and keeping torch out
of ``tests.support.models`` keeps that module cheap to import.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Standardise, one hidden layer, and return ``(logits, probabilities)``: two outputs.

    The standardisation constants are buffers, so the footprint covers buffers as well as weights.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.hidden = nn.Linear(mean.numel(), hidden)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (x - self.mean) / self.std
        logits = self.out(torch.relu(self.hidden(z)))
        return logits, torch.softmax(logits, dim=1)


def train(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int, steps: int = 40) -> TinyMLP:
    torch.manual_seed(seed)
    std = x.std(dim=0)
    model = TinyMLP(x.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std)), n_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(model(x)[0], y).backward()
        optimiser.step()
    return model.eval()


class ListOutput(nn.Module):
    """Returns a list: no fixed output names, so the torchscript loader must refuse it."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, x]
