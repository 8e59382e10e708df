"""Loss functions of the alignment algorithms (offline and online), one file per algorithm.

Every public function here is pure: tensors in, ``(per-example loss, metrics)``
out, no process groups and no global state (the one exception says so in its
name or its ``tp_group`` argument). The trainer owns reduction across
micro-batches and data-parallel ranks, so each module states the normalizer
its per-example loss is meant to be divided by.

- :mod:`aligner.algorithms.logprobs`: sequence log-probs from (vocab-parallel)
  logits with padded-vocabulary masking; reward-model scores at the last token.
- :mod:`aligner.algorithms.sft`: summed token NLL, normalized by the global
  token count (SFT and SteerLM SFT).
- :mod:`aligner.algorithms.reward`: pairwise Bradley-Terry loss (margin,
  reward centering) and the multi-attribute regression loss (SteerLM RM).
- :mod:`aligner.algorithms.dpo`: the DPO family (DPO/cDPO, IPO, hinge,
  NeMo-Aligner's reward-aware RPO, SimPO, ORPO) and the optional SFT term.
- :mod:`aligner.algorithms.kto`: KTO with its KL reference point.
- :mod:`aligner.algorithms.policy_gradient`: what the online RL losses share:
  loss aggregation (token-mean, seq-mean-token-mean/-sum, Dr. GRPO's
  sum / (N * L_max)) normalized by global counts, the clipped surrogate
  (clip-higher, dual clip, GSPO's sequence ratio), KL in the loss or in the
  reward, engine-vs-trainer importance weights and mismatch metrics.
- :mod:`aligner.algorithms.grpo`: GRPO advantages, DAPO's dynamic sampling and
  overlong shaping, and the GRPO / DAPO / Dr. GRPO / GSPO presets.
- :mod:`aligner.algorithms.reinforce`: NeMo-Aligner's REINFORCE (leave-one-out
  baseline, KL in the reward) and RLOO advantages.

Metrics are dicts of detached 0-dim tensors (per-attribute metrics are
``[K]``), never Python floats, so that reading them costs no device sync until
the trainer logs them.

Nothing is imported here: ``import aligner.algorithms.dpo`` pulls in only torch.
"""
