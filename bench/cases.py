"""What we benchmark: every aligner op against the plain-PyTorch code it replaces.

The baselines below are what RL code does today (the log-prob baseline upcasts
bf16 logits like real trainers do; the GAE loop follows NeMo-Aligner's
`calculate_advantages_and_returns`), written here independently of aligner.
Sizes shrink to seconds when ALIGNER_BENCH_QUICK=1.
"""

from __future__ import annotations

import functools

import torch
from harness import QUICK, Case, GroupSpec, Target, bench_device

import aligner
from aligner import ops

TEMPERATURE = 1.0
GAMMA, LAM = 1.0, 0.95
# (tokens, vocab): a 32k-vocab model (Llama-2/Mistral) and a 128k-vocab one (Llama-3).
LOGIT_SHAPES = ((256, 4096),) if QUICK else ((4096, 32768), (2048, 128256))
GAE_SHAPE = (32, 128) if QUICK else (256, 1024)  # (batch, seq)
SMALL_OPS_SHAPE = (32, 256) if QUICK else (256, 1024)  # (batch, seq)
GROUPS = (64, 8) if QUICK else (4096, 16)  # (prompts, samples per prompt)
# (tokens, hidden, vocab) of the LM head: Llama-2-sized and Llama-3-sized vocabularies.
LINEAR_SHAPES = ((256, 128, 4096),) if QUICK else ((4096, 1024, 32768), (4096, 1024, 128256))
# (rows, hidden, vocab) of a greedy decode step: the engine bench's model (bench/generation_speed.py) at
# batch 32 and 8, and a Llama-3-sized vocabulary.
GREEDY_SHAPES = ((8, 64, 4096),) if QUICK else ((32, 256, 32768), (8, 256, 32768), (32, 1024, 128256))

TORCH, ALIGNER, EXP_FLOOR = "torch", "aligner", "exp floor"
FUSED, LOGPROBS_ONLY = "aligner fused", "aligner token_logprobs"
MATMUL_ONLY = "matmul alone"
CHUNKED, CUTLASS = "aligner chunked", "aligner cutlass"
LOGPROB_FWD_SPEEDUP = {torch.float32: 4.0, torch.bfloat16: 5.0}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------- baselines


def torch_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax over the whole vocabulary, then gather: [N, V] -> [N]."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # no extra pass at T=1
    log_probs = torch.log_softmax(scaled, dim=-1)
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def torch_token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-(softmax * log_softmax).sum(-1): [N, V] -> [N]."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return -(torch.softmax(scaled, dim=-1) * torch.log_softmax(scaled, dim=-1)).sum(-1)


def torch_greedy_step(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's head: the logits, their argmax, and its log_softmax: [N, H] x [V, H] -> ([N], [N])."""
    logits = hidden @ weight.T
    tokens = logits.argmax(dim=-1)
    return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def torch_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The LM head then log_softmax and gather: [N, H] x [V, H] -> [N, V] logits -> [N]."""
    return torch_token_logprobs(hidden @ weight.T, labels, TEMPERATURE)


def nemo_gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as a Python loop over time, masked positions zeroed first (NeMo-Aligner): [B, T]."""
    values = values * mask
    rewards = rewards * mask
    seq_len = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(seq_len)):
        next_values = values[:, t + 1] if t + 1 < seq_len else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def verl_gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as a Python loop where masked tokens pass (V_next, A_next) through (verl multi-turn)."""
    keep = mask.float()
    next_values = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        candidate = delta + gamma * lam * running
        next_values = values[:, t] * keep[:, t] + (1 - keep[:, t]) * next_values
        running = candidate * keep[:, t] + (1 - keep[:, t]) * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages * keep, (advantages + values) * keep


def torch_kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator exp(-d) + d - 1 with d = logprobs - ref_logprobs."""
    diff = logprobs - ref_logprobs
    return torch.exp(-diff) + diff - 1


def torch_masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid elements; zero elsewhere."""
    keep = mask.to(x.dtype)
    count = keep.sum()
    mean = (x * keep).sum() / count
    var = ((x - mean) ** 2 * keep).sum() / count
    return (x - mean) * torch.rsqrt(var + eps) * keep


def torch_group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), samples of a prompt adjacent: [P*G]."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view_as(rewards)


# ---------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=1)
def _logits(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached so the four log-prob groups of one shape share one (up to 1 GiB) tensor.
    device = bench_device()
    logits = (2 * torch.randn(tokens, vocab, device=device)).to(dtype)  # [N, V]
    labels = torch.randint(0, vocab, (tokens,), device=device)  # [N]
    return logits, labels


def _right_padded_mask(batch: int, seq: int) -> torch.Tensor:
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), device=bench_device())
    return torch.arange(seq, device=bench_device()) < lengths  # [B, T] bool


def _grad_of(fn, leaf: torch.Tensor, grad_out: torch.Tensor):
    def forward_backward():
        return torch.autograd.grad(fn(leaf), leaf, grad_out)

    return forward_backward


# ---------------------------------------------------------------- groups


def _logprob_fwd(tokens: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    logits, labels = _logits(tokens, vocab, dtype)
    floor_out = torch.empty_like(logits)
    return [
        Case(TORCH, lambda: torch_token_logprobs(logits, labels, TEMPERATURE), logits.nbytes),
        Case(EXP_FLOOR, lambda: torch.exp(logits, out=floor_out), logits.nbytes),
        Case(ALIGNER, lambda: ops.token_logprobs(logits, labels, temperature=TEMPERATURE), logits.nbytes),
    ]


def _logprob_fwd_bwd(tokens: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    logits, labels = _logits(tokens, vocab, dtype)
    leaf = logits.detach().requires_grad_()
    grad_out = torch.ones(tokens, device=logits.device)
    passes = 2 * logits.nbytes  # forward reads the logits, backward reads them again
    return [
        Case(TORCH, _grad_of(lambda x: torch_token_logprobs(x, labels, TEMPERATURE), leaf, grad_out), passes),
        Case(
            ALIGNER,
            _grad_of(lambda x: ops.token_logprobs(x, labels, temperature=TEMPERATURE), leaf, grad_out),
            passes,
        ),
    ]


def _entropy_fwd(tokens: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    logits, _ = _logits(tokens, vocab, dtype)
    return [
        Case(TORCH, lambda: torch_token_entropy(logits, TEMPERATURE), logits.nbytes),
        Case(ALIGNER, lambda: ops.token_entropy(logits, temperature=TEMPERATURE), logits.nbytes),
    ]


def _fused_fwd(tokens: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    logits, labels = _logits(tokens, vocab, dtype)

    def both_baselines():
        return torch_token_logprobs(logits, labels, TEMPERATURE), torch_token_entropy(logits, TEMPERATURE)

    return [
        Case(TORCH, both_baselines, logits.nbytes),
        Case(
            FUSED,
            lambda: ops.token_logprobs_and_entropy(logits, labels, temperature=TEMPERATURE),
            logits.nbytes,
        ),
        Case(LOGPROBS_ONLY, lambda: ops.token_logprobs(logits, labels, temperature=TEMPERATURE), logits.nbytes),
    ]


def logprob_specs() -> list[GroupSpec]:
    """token_logprobs / token_entropy / fused, forward and forward+backward, per shape and dtype."""
    section = "Token log-probs and entropy"
    specs = []
    for tokens, vocab in LOGIT_SHAPES:
        for dtype, name in DTYPE_NAMES.items():
            shape = f"{name} N={tokens} V={vocab}"
            args = (tokens, vocab, dtype)
            speedup = LOGPROB_FWD_SPEEDUP[dtype]
            specs += [
                GroupSpec(
                    section,
                    f"token_logprobs fwd {shape}",
                    (TORCH, EXP_FLOOR, ALIGNER),
                    functools.partial(_logprob_fwd, *args),
                    (
                        Target(f"fwd >= {speedup:g}x torch", TORCH, ALIGNER, speedup, at_least=True),
                        Target("fwd no slower than exp floor", EXP_FLOOR, ALIGNER, 1.0, at_least=True),
                        Target(
                            "fwd peak extra mem <= 1% of torch",
                            ALIGNER,
                            TORCH,
                            0.01,
                            at_least=False,
                            quantity="memory",
                        ),
                    ),
                ),
                GroupSpec(
                    section,
                    f"token_logprobs fwd+bwd {shape}",
                    (TORCH, ALIGNER),
                    functools.partial(_logprob_fwd_bwd, *args),
                    (Target("fwd+bwd >= 3x torch", TORCH, ALIGNER, 3.0, at_least=True),),
                ),
                GroupSpec(
                    section, f"token_entropy fwd {shape}", (TORCH, ALIGNER), functools.partial(_entropy_fwd, *args)
                ),
                GroupSpec(
                    section,
                    f"token_logprobs_and_entropy fwd {shape}",
                    (TORCH, FUSED, LOGPROBS_ONLY),
                    functools.partial(_fused_fwd, *args),
                    (Target("fused <= 1.2x token_logprobs time", FUSED, LOGPROBS_ONLY, 1.2, at_least=False),),
                ),
            ]
    return specs


def _linear_inputs(
    tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    device = bench_device()
    hidden = torch.randn(tokens, hidden_size, device=device).to(dtype)  # [N, H]
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)  # [V, H]
    labels = torch.randint(0, vocab, (tokens,), device=device)  # [N]
    return hidden, weight, labels


def _linear_fwd(tokens: int, hidden_size: int, vocab: int) -> list[Case]:
    hidden, weight, labels = _linear_inputs(tokens, hidden_size, vocab)
    read = hidden.nbytes + weight.nbytes
    return [
        Case(TORCH, lambda: torch_linear_token_logprobs(hidden, weight, labels), read),
        Case(MATMUL_ONLY, lambda: hidden @ weight.T, read),
        Case(ALIGNER, lambda: ops.linear_token_logprobs(hidden, weight, labels, temperature=TEMPERATURE), read),
    ]


def _linear_fwd_bwd(tokens: int, hidden_size: int, vocab: int) -> list[Case]:
    hidden, weight, labels = _linear_inputs(tokens, hidden_size, vocab)
    hidden.requires_grad_()
    weight.requires_grad_()
    grad_out = torch.ones(tokens, device=hidden.device)
    read = 2 * (hidden.nbytes + weight.nbytes)

    def grads_of(fn):
        return lambda: torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight), grad_out)

    def aligner_head(h, w, y):
        return ops.linear_token_logprobs(h, w, y, temperature=TEMPERATURE)

    return [
        Case(TORCH, grads_of(torch_linear_token_logprobs), read),
        Case(ALIGNER, grads_of(aligner_head), read),
    ]


def _linear_fwd_impls(tokens: int, hidden_size: int, vocab: int) -> list[Case]:
    hidden, weight, labels = _linear_inputs(tokens, hidden_size, vocab, torch.bfloat16)
    read = hidden.nbytes + weight.nbytes

    def head(impl: str):
        return lambda: ops.linear_token_logprobs(hidden, weight, labels, temperature=TEMPERATURE, impl=impl)

    return [
        Case(CHUNKED, head("chunked"), read),
        Case(CUTLASS, head("cutlass"), read),
        Case(MATMUL_ONLY, lambda: hidden @ weight.T, read),
    ]


def _memory_at_most(label: str, row: str, baseline: str, ratio: float) -> Target:
    return Target(label, row, baseline, ratio, at_least=False, quantity="memory")


def linear_specs() -> list[GroupSpec]:
    """linear_token_logprobs (chunked LM head + log-probs) against the matmul then log_softmax/gather.

    fp32 forward at every shape, with the matmul alone as the floor; forward+backward
    at the first shape only (a CPU takes seconds per matmul at full size). On a GPU
    also the bf16 forward, fused CUTLASS kernel against the chunked path.
    """
    section = "LM head log-probs (linear_token_logprobs)"
    with_cutlass = bench_device().type == "cuda" and aligner.build_info()["has_cuda_kernels"]
    specs = []
    for i, (tokens, hidden_size, vocab) in enumerate(LINEAR_SHAPES):
        args = (tokens, hidden_size, vocab)

        def group(title: str, labels: tuple[str, ...], make_cases, *targets: Target) -> GroupSpec:
            return GroupSpec(section, title, labels, functools.partial(make_cases, *args), targets)  # noqa: B023

        shape = f"N={tokens} H={hidden_size} V={vocab}"
        specs.append(
            group(
                f"linear_token_logprobs fwd fp32 {shape}",
                (TORCH, MATMUL_ONLY, ALIGNER),
                _linear_fwd,
                _memory_at_most("fwd peak extra mem <= 10% of torch", ALIGNER, TORCH, 0.10),
                Target("fwd time <= 1.3x the matmul alone", ALIGNER, MATMUL_ONLY, 1.3, at_least=False),
            )
        )
        if i == 0:
            specs.append(group(f"linear_token_logprobs fwd+bwd fp32 {shape}", (TORCH, ALIGNER), _linear_fwd_bwd))
        if with_cutlass:
            specs.append(
                group(
                    f"linear_token_logprobs fwd bf16 {shape} cutlass vs chunked",
                    (CHUNKED, CUTLASS, MATMUL_ONLY),
                    _linear_fwd_impls,
                    Target("cutlass fwd no slower than chunked", CHUNKED, CUTLASS, 1.0, at_least=True),
                    _memory_at_most("cutlass fwd peak extra mem <= chunked", CUTLASS, CHUNKED, 1.0),
                )
            )
    return specs


def _greedy_step(rows: int, hidden_size: int, vocab: int) -> list[Case]:
    hidden, weight, _ = _linear_inputs(rows, hidden_size, vocab)
    read = hidden.nbytes + weight.nbytes
    return [
        Case(TORCH, lambda: torch_greedy_step(hidden, weight), read),
        Case(MATMUL_ONLY, lambda: hidden @ weight.T, read),
        Case(ALIGNER, lambda: ops.linear_greedy(hidden, weight), read),
    ]


def greedy_specs() -> list[GroupSpec]:
    """linear_greedy (a decode step's LM head, argmax and log-prob) against the logits, argmax and log_softmax.

    On CPU (float32) it is the fused kernel and should beat even the matmul alone (it reads the weight once,
    without BLAS's packing copy, and never writes the logits); on a GPU it composes the same torch ops.
    """
    on_cpu = bench_device().type == "cpu"
    specs = []
    for rows, hidden_size, vocab in GREEDY_SHAPES:
        targets = (
            (
                Target("greedy step >= 2x torch", TORCH, ALIGNER, 2.0, at_least=True),
                Target("greedy step no slower than the matmul alone", MATMUL_ONLY, ALIGNER, 1.0, at_least=True),
            )
            if on_cpu and rows >= 16
            else ()
        )
        specs.append(
            GroupSpec(
                "LM head greedy step (linear_greedy)",
                f"linear_greedy fp32 N={rows} H={hidden_size} V={vocab}",
                (TORCH, MATMUL_ONLY, ALIGNER),
                functools.partial(_greedy_step, rows, hidden_size, vocab),
                targets,
            )
        )
    return specs


def _gae(loop, mask_mode: str) -> list[Case]:
    batch, seq = GAE_SHAPE
    rewards = torch.randn(batch, seq, device=bench_device())
    values = torch.randn(batch, seq, device=bench_device())
    mask = _right_padded_mask(batch, seq)
    read = rewards.nbytes + values.nbytes + mask.nbytes
    return [
        Case(TORCH, lambda: loop(rewards, values, mask, GAMMA, LAM), read),
        Case(
            ALIGNER,
            lambda: ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, mask_mode=mask_mode),
            read,
        ),
    ]


def gae_specs() -> list[GroupSpec]:
    """gae in both mask modes against the Python loops it replaces."""
    batch, seq = GAE_SHAPE
    speedup = Target("gae >= 20x torch loop", TORCH, ALIGNER, 20.0, at_least=True)
    return [
        GroupSpec(
            "GAE",
            f"gae zero fp32 B={batch} T={seq}",
            (TORCH, ALIGNER),
            functools.partial(_gae, nemo_gae_loop, "zero"),
            (speedup,),
        ),
        GroupSpec(
            "GAE",
            f"gae carry_forward fp32 B={batch} T={seq}",
            (TORCH, ALIGNER),
            functools.partial(_gae, verl_gae_loop, "carry_forward"),
            (speedup,),
        ),
    ]


def _kl_k3() -> list[Case]:
    logprobs = -torch.rand(SMALL_OPS_SHAPE, device=bench_device())
    ref_logprobs = -torch.rand(SMALL_OPS_SHAPE, device=bench_device())
    read = 2 * logprobs.nbytes
    return [
        Case(TORCH, lambda: torch_kl_k3(logprobs, ref_logprobs), read),
        Case(ALIGNER, lambda: ops.kl_penalty(logprobs, ref_logprobs, estimator="k3"), read),
    ]


def _masked_whiten() -> list[Case]:
    x = torch.randn(SMALL_OPS_SHAPE, device=bench_device())
    mask = _right_padded_mask(*SMALL_OPS_SHAPE)
    read = x.nbytes + mask.nbytes
    return [
        Case(TORCH, lambda: torch_masked_whiten(x, mask), read),
        Case(ALIGNER, lambda: ops.masked_whiten(x, mask), read),
    ]


def _group_advantages() -> list[Case]:
    prompts, group_size = GROUPS
    rewards = torch.randn(prompts * group_size, device=bench_device())
    return [
        Case(TORCH, lambda: torch_group_advantages(rewards, group_size), rewards.nbytes),
        Case(ALIGNER, lambda: ops.group_advantages(rewards, group_size), rewards.nbytes),
    ]


def small_op_specs() -> list[GroupSpec]:
    """kl_penalty (k3), masked_whiten and group_advantages against their torch one-liners."""
    batch, seq = SMALL_OPS_SHAPE
    prompts, group_size = GROUPS
    section = "Small RL ops"
    return [
        GroupSpec(section, f"kl_penalty k3 fp32 {batch}x{seq}", (TORCH, ALIGNER), _kl_k3),
        GroupSpec(section, f"masked_whiten fp32 {batch}x{seq}", (TORCH, ALIGNER), _masked_whiten),
        GroupSpec(
            section,
            f"group_advantages fp32 P={prompts} G={group_size}",
            (TORCH, ALIGNER),
            _group_advantages,
        ),
    ]


def all_specs() -> list[GroupSpec]:
    """Every group, in the order run.py measures and prints them."""
    return logprob_specs() + linear_specs() + greedy_specs() + gae_specs() + small_op_specs()
