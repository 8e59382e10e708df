"""Float64 references of the sampler, row by row, written independently of aligner.generation.sampling."""

import torch


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Row by row in float64: temperature, keep the top-k set, then the nucleus, renormalize."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for row, values in enumerate(logits.double() / temperature):
        order = sorted(range(values.numel()), key=lambda i: -values[i].item())
        keep = set(order)
        if top_k:
            kth = values[order[top_k - 1]].item()
            keep = {i for i in order if values[i].item() >= kth}
        kept = torch.tensor(sorted(keep))
        probs = torch.zeros_like(values)
        probs[kept] = torch.softmax(values[kept], dim=0)
        if top_p < 1:
            nucleus, mass = [], 0.0
            for i in sorted(keep, key=lambda i: -probs[i].item()):
                if mass >= top_p:
                    break
                nucleus.append(i)
                mass += probs[i].item()
            kept = torch.tensor(nucleus)
            probs = torch.zeros_like(values)
            probs[kept] = torch.softmax(values[kept], dim=0)
        out[row] = probs
    return out


def reference_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int, top_p: float, greedy: bool
) -> torch.Tensor:
    """``[B]`` float64 log-prob of ``tokens`` under the distribution drawn from (T = 1, unfiltered if greedy)."""
    if greedy:
        return logits.double().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    probs = reference_probs(logits, temperature, top_k, top_p)
    return probs.gather(-1, tokens[:, None]).squeeze(-1).log()
