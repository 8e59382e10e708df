"""Generation engines: turn prompts into rollouts ``(tokens, lengths, is_end)``.

- :mod:`aligner.generation.torch_engine`: the built-in engine, plain forward
  passes of a megatron-core GPTModel (any machine, tensor-parallel aware), and
  the pure sampling helpers it uses (:func:`~aligner.generation.torch_engine.sample_next_token`).

Nothing is imported here: megatron-core takes seconds to import.
"""
