"""Elementwise closeness with a readable failure, shared by the kernel tests."""

import math

import torch


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """|got - expected| <= atol + rtol * |expected| elementwise, compared in float64 on the CPU.

    Equal values (infinities included) are exact; NaN anywhere else is an
    infinite error. The failure names the worst element and its index.
    """
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    error = torch.where(got == expected, 0.0, (got - expected).abs().nan_to_num(nan=math.inf))
    allowed = atol + rtol * expected.abs()
    excess = error - allowed
    if excess.numel() and excess.max() > 0:
        at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name}: |got - expected| = {error[at].item():.3e} > {allowed[at].item():.3e} at {at} "
            f"(got {got[at].item()!r}, expected {expected[at].item()!r}); max error {error.max().item():.3e}"
        )
