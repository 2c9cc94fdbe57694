"""Independent f64 oracles for the node's arithmetic (docs/protocol.md, "Aggregation"), written from
the formulas, not from the SDK or the node: weighted means, correct rounding to bfloat16, round
half to even for integers, the FedAdam step with Flower's bias correction, FedBuff's staleness
weights."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_nearest(x: np.ndarray) -> np.ndarray:
    """Correct rounding of float64 values to bfloat16 (nearest, ties to even), decided in float64
    between the two bfloat16 neighbours of each value."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.empty(x.shape, dtype=BF16)
    for i, v in enumerate(x):
        # bfloat16 is the top half of a float32: enumerate the neighbours from a truncation.
        f = np.float32(v)
        bits = int(np.array([f], dtype=np.float32).view(np.uint32)[0]) & 0xFFFF0000
        cands = []
        for b in (bits - 0x10000, bits, bits + 0x10000, bits + 0x20000):
            b &= 0xFFFFFFFF
            c = float(np.array([b], dtype=np.uint32).view(np.float32)[0])
            if math.isfinite(c):
                cands.append((abs(c - v), (b >> 16) & 1, b))
        cands.sort()
        best = cands[0]
        if len(cands) > 1 and cands[1][0] == best[0]:
            best = min(cands[0], cands[1], key=lambda t: t[1])  # tie: the even one
        out[i] = np.array([best[2]], dtype=np.uint32).view(np.float32)[0].astype(BF16)
    return out


def weighted_mean(values: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ w_i x_i / Σ w_i in float64."""
    acc = sum(np.asarray(v, dtype=np.float64) * w for v, w in zip(values, weights))
    return acc / sum(weights)


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Integers from float64 values, ties to even (numpy's rint)."""
    return np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64)


def assert_f32_close(got: np.ndarray, oracle: np.ndarray, rel: float = 1e-6) -> None:
    """``got`` (float32) within ``rel`` of the float64 oracle, element-wise (1e-30 absolute floor)."""
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - oracle)
    bound = rel * np.maximum(np.abs(oracle), 1e-30)
    assert np.all(err <= bound), f"max relative error {np.max(err / np.maximum(np.abs(oracle), 1e-30)):.3g}: {got} vs {oracle}"


class FedAdam:
    """Adam on the server (Reddi et al. 2021) with Flower's bias correction:
    η_t = η·√(1−β₂^(t+1))/(1−β₁^(t+1)); m_t = β₁m + (1−β₁)Δ; v_t = β₂v + (1−β₂)Δ²;
    x ← x + η_t·m_t/(√v_t + τ), with Δ = aggregated − global per element in float64."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.b1, self.b2, self.tau = lr, beta1, beta2, tau
        self.t = 0
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, global_: np.ndarray, aggregated: np.ndarray) -> np.ndarray:
        d = np.asarray(aggregated, np.float64) - np.asarray(global_, np.float64)
        if self.m is None:
            self.m, self.v = np.zeros_like(d), np.zeros_like(d)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * d
        self.v = self.b2 * self.v + (1 - self.b2) * d * d
        e = self.t + 1
        lr = self.lr * math.sqrt(1 - self.b2**e) / (1 - self.b1**e)
        return np.asarray(global_, np.float64) + lr * self.m / (np.sqrt(self.v) + self.tau)


def polynomial_staleness(tau: int, exponent: float) -> float:
    """FedBuff's s(τ) = 1/(1+τ)^e (not normalised)."""
    return 1.0 / (1.0 + tau) ** exponent
