"""Pieces every training loop composes, offline or online.

- :mod:`~aligner.trainers.state`: :func:`build_train_state` (model + megatron DDP + optimizer + scheduler);
- :mod:`~aligner.trainers.step`: :func:`train_step`, :func:`forward_only`, :func:`evaluate`;
- :mod:`~aligner.trainers.run`: :class:`Run` (resume, cadence, checkpoints, metric sinks, progress bar);
- :mod:`~aligner.trainers.fit`: :func:`fit`, the offline loop over them, and :func:`fit_model` (state + run + fit);
- :mod:`~aligner.trainers.reference`: frozen-model passes (reference log-probs, precomputed or per step).
"""
