"""An analytic teacher: the exact RF velocity of an isotropic Gaussian mixture, for testing samplers and distillation.

With x0 ~ sum_k w_k N(mu_k, std_k^2 I) and x_s = (1-s) x0 + s eps, each component's x_s is Gaussian with mean
(1-s) mu_k and variance var_k = (1-s)^2 std_k^2 + s^2, so the exact velocity E[eps - x0 | x_s] is closed form.
"""
from __future__ import annotations

import torch


class GaussianMixtureField:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        self.means = means.double()              # [K, D]
        self.stds = stds.double()                # [K]
        self.weights = weights.double() / weights.sum()

    @classmethod
    def default_2d(cls) -> "GaussianMixtureField":
        """Three well-separated 2-D modes of unequal weight: easy to see collapse or bias."""
        return cls(means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
                   stds=torch.tensor([0.3, 0.5, 0.25]), weights=torch.tensor([0.5, 0.3, 0.2]))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * noise

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (self.weights[:, None] * self.means).sum(0)
        centred = self.means - mean
        cov = sum(w * (torch.outer(c, c) + s ** 2 * torch.eye(len(mean), dtype=torch.float64))
                  for w, c, s in zip(self.weights, centred, self.stds))
        return mean, cov

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, context=None) -> torch.Tensor:
        """Exact E[eps - x0 | x_s]; x is [B, D], sigma is [B] RF time (context ignored)."""
        x64, s = x.double(), sigma.double()[:, None, None]                         # s: [B, 1, 1]
        mean_k = (1 - s) * self.means[None]                                         # [B, K, D]
        var_k = (1 - s) ** 2 * self.stds[None, :, None] ** 2 + s ** 2               # [B, K, 1]
        resid = x64[:, None, :] - mean_k
        dim = x.shape[1]
        log_p = (torch.log(self.weights)[None] - 0.5 * (resid ** 2 / var_k).sum(-1)
                 - 0.5 * dim * torch.log(var_k[..., 0]))
        post = torch.softmax(log_p, dim=1)[..., None]                               # [B, K, 1]
        x0_k = self.means[None] + (1 - s) * self.stds[None, :, None] ** 2 / var_k * resid
        eps_k = s / var_k * resid
        return ((post * (eps_k - x0_k)).sum(1)).to(x.dtype)


class ToyVelocityMLP(torch.nn.Module):
    """A small RF velocity network for 2-D toys: v(x, s) with sinusoidal features of s (context ignored)."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers, inputs = [], dim + 16
        for _ in range(depth):
            layers += [torch.nn.Linear(inputs, width), torch.nn.SiLU()]
            inputs = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, dim))
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, 4.0, 8)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context=None) -> torch.Tensor:
        angles = sigma.float()[:, None] * self.freqs * 3.0
        return self.net(torch.cat([x.float(), torch.sin(angles), torch.cos(angles)], dim=1)).to(x.dtype)


def fit_to_field(mlp: ToyVelocityMLP, field: GaussianMixtureField, steps: int = 1500, batch: int = 512,
                 seed: int = 0) -> ToyVelocityMLP:
    """Regress the MLP onto the exact field velocity (a 'trained teacher copy' to initialise a student from)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = field.sample(batch, generator).float()
        sigma = torch.rand(batch, generator=generator)
        x_s = (1 - sigma[:, None]) * x0 + sigma[:, None] * torch.randn(x0.shape, generator=generator)
        loss = ((mlp(x_s, sigma) - field.velocity(x_s, sigma)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mlp.eval()


class ToyData:
    """Distillation data from the field itself (the teacher's exact samples): batch b is a pure function of b."""

    def __init__(self, field: GaussianMixtureField, seed: int = 0):
        self.field, self.seed = field, seed

    def batch(self, batch_index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        x0 = self.field.sample(batch_size, generator).float()[rank::world_size]
        return {"x0": x0, "context": None, "negative": None}


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """E|a-b| - (E|a-a'| + E|b-b'|)/2 (>= 0, zero iff equal distributions): a sample-vs-sample distance."""
    a, b = a.double(), b.double()
    return float(torch.cdist(a, b).mean() - 0.5 * (torch.cdist(a, a).mean() + torch.cdist(b, b).mean()))
