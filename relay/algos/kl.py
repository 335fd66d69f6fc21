"""KL estimators between the policy and the reference, and KL coefficient controllers.

With r = log pi(a) - log pi_ref(a) for a sampled from pi (Schulman, "Approximating KL divergence"):
k1 = r (unbiased, can be negative), k2 = r^2 / 2 (biased, low variance), k3 = exp(-r) - 1 + r (unbiased, >= 0;
clamped to [0, 10] per token, as verl and OpenRLHF do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

K3_LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs ([B, T])."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        # Clamped as verl's low_var_kl does: the log-ratio to [-20, 20] so exp cannot overflow, and the estimate
        # to [-10, 10] (OpenRLHF clamps the same way). A log-ratio clamp alone still let one token reach
        # exp(20) ~ 4.85e8 and swamp the batch's KL; past the clamps that token's KL gradient is 0, as in the peers.
        r = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return (torch.exp(-r) - 1.0 + r).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"kl_estimator: unknown estimator {estimator!r} (use k1, k2 or k3)")


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(old || new), the usual PPO 'approx_kl' diagnostic; 0 when they are equal."""
    log_ratio = logprobs.float() - old_logprobs.float()
    return torch.exp(log_ratio) - 1.0 - log_ratio


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL tracks `target`, proportionally, clipped."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        if not math.isfinite(self.value):
            raise FloatingPointError(f"adaptive KL coefficient became {self.value}")
        return self.value


def make_kl_controller(kl_coef: float, adaptive: bool, target_kl: float, horizon: int):
    return AdaptiveKLController(kl_coef, target_kl, horizon) if adaptive else FixedKLController(kl_coef)
