"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import torch
from torch import Tensor

from lightrlhf.training.numerics import NumericFault
from lightrlhf.validation import in_range, non_negative


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set the logits of removed tokens to -inf; returns a new tensor [..., V].

    top_k: keep the k largest logits (0 = off); tokens tied with the k-th are all kept.
    top_p: then keep the smallest set of most probable tokens whose cumulative probability,
      under the softmax of the top-k-filtered logits, reaches top_p (Holtzman et al. 2020, "The
      Curious Case of Neural Text Degeneration"); at least one token is always kept, and among
      tokens of equal probability the lower index is kept first.
    """
    non_negative("top_k", top_k)
    in_range("top_p", top_p, 0.0, 1.0)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # detail: stable sort, so ties are broken by index and the result is deterministic.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        # detail: cumulative sums in float32; summing a bf16 softmax loses the boundary.
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # A token is dropped once the more probable ones already reach top_p. detail: the 1e-6
        # slack lets a set that reaches top_p exactly on paper (0.5 + 0.3 for 0.8) count as
        # reaching it despite float rounding. The first token has mass_before 0 and is kept.
        drop_sorted = mass_before >= top_p - 1e-6
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of logits [B, V]: argmax when temperature == 0, otherwise a draw from
    softmax(filter_logits(logits / temperature, top_k, top_p)). Returns long [B]."""
    non_negative("temperature", temperature)
    check_sampleable(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    return draw_from(torch.softmax(filtered, dim=-1), generator)


def draw_from(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probabilities [B, V] by inverting the cumulative distribution: the first
    index whose cumulative probability exceeds u * total, u ~ U[0, 1). One uniform number per row,
    where `torch.multinomial` draws V (an exponential per entry): at V = 2,000 that was about 1 ms of
    a 6 ms decode step on CPU. The sum runs in float64, so a token's share of [0, total) is its
    probability to ~1e-16 even over a 150k vocabulary; a zero-probability token adds an empty
    interval and is never drawn."""
    cumulative = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, u, right=True).squeeze(-1)
    return index.clamp(max=probs.shape[-1] - 1)


def check_sampleable(logits: Tensor) -> None:
    """Raise `NumericFault` when a row of logits [B, V] holds NaN or +inf, or nothing but -inf.

    Such a row has no distribution to draw from: torch.multinomial would fail with a bare
    RuntimeError ("probability tensor contains either inf, nan or element < 0") and argmax would
    return an arbitrary token. A diverged model is the usual cause, so the message says that."""
    nan_rows = torch.isnan(logits).any(dim=-1)
    bad = nan_rows | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    if bool(bad.any()):
        what = "nan" if bool(nan_rows.any()) else "inf"
        raise NumericFault(f"sampling: the model's next-token logits are {what} in {int(bad.sum())} of "
                           f"{bad.numel()} rows; its weights or activations are not finite (a diverged run?), "
                           "so nothing can be sampled")
