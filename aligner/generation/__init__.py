"""Generation engines: turn prompts into rollouts (tokens, lengths, is_end, log-probs as drawn) with versioned weights.

- :mod:`aligner.generation.base`: the contract every engine keeps: :class:`~aligner.generation.base.Engine`
  (``generate``, ``refit``, ``refit_from_hf_buckets``, ``sleep`` / ``wake``, ``version``),
  :class:`~aligner.generation.base.SamplingParams`, :class:`~aligner.generation.base.Rollouts`,
  :class:`~aligner.generation.base.StaleWeightsError`.
- :mod:`aligner.generation.torch_engine`: the built-in engine,
  :class:`~aligner.generation.torch_engine.TorchEngine`, over a megatron-core GPTModel shard (any
  machine, tensor-parallel aware), and the one-call :func:`~aligner.generation.torch_engine.generate`.
- :mod:`aligner.generation.megatron_engine`: :class:`~aligner.generation.megatron_engine.MegatronEngine`,
  megatron-core's inference forward and KV cache with the torch engine's sampler and stops (CUDA,
  tensor parallelism; ``sleep`` frees the KV cache).
- :mod:`aligner.generation.sampling`: the pure sampler (temperature, top-k, top-p; the log-prob as drawn).
- :mod:`aligner.generation.refit`: a model's weights as Hugging Face-named buckets (from every pipeline
  stage), for engines that hold their own copy, and that copy for a pipeline-parallel trainer
  (:func:`~aligner.generation.refit.build_engine_model`).
- :mod:`aligner.generation.steerlm`: SteerLM generation with chosen attribute values.

Nothing is imported here: megatron-core takes seconds to import.
"""
