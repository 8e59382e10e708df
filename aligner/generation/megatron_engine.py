"""Generation on megatron-core's own inference stack: its KV-cache context and inference forward, aligner's sampler.

    engine = MegatronEngine(model, eos_token_id=2, pad_token_id=0, detokenize=tokenizer.decode)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=256, temperature=0.7, seed=1))
    engine.sleep()                        # before training: the KV cache is freed
    engine.wake()                         # before the next generation: the KV cache is allocated again
    engine.refit(actor, version=step)     # the trainer's own model: a no-op that records the version

Selected by ``generation.backend: megatron``; it runs on CUDA devices (the torch
engine, :mod:`aligner.generation.torch_engine`, runs everywhere and is the reference).

What is megatron-core's (0.16) and what is aligner's:

- megatron-core: the forward with a KV cache.
  ``GPTInferenceWrapper`` (``inference/model_inference_wrappers/gpt/gpt_inference_wrapper.py``)
  over a ``StaticInferenceContext`` (``inference/contexts/static_context.py``):
  the model's own attention writes each layer's keys and values into the
  context's buffers (``[max_sequence_length, max_batch_size, ...]`` per layer,
  allocated at the first forward by ``Attention._adjust_key_value_for_inference``)
  and attends over them; the wrapper gathers the tensor-parallel logits.
- aligner: the loop around it, the same as megatron's static loop
  (``TextGenerationController.generate_all_output_tokens_static_batch``): the
  prompts, right-padded, are prefilled up to the shortest one; then each
  forward feeds one column of every row, the row's next prompt token while it
  is still in its prompt (so every row sits at its own positions) and its drawn
  token after. The draws, their log-probs, the stop rules and the
  :class:`~aligner.generation.base.Rollouts` are the torch engine's
  (:func:`aligner.generation.sampling.sample_as`, the torch engine's
  stop checks), so both engines keep one contract.

The log-probs are therefore the contract's, "as drawn": for a sampled token,
``log_softmax(filtered(logits / T))[token]`` after temperature, top-k and top-p;
with greedy decoding, ``log_softmax(logits)[token]``, all in float32 over the
real vocabulary (padding columns are never drawn). megatron's own sampler is not
used because it does not keep that contract: its log-probs are the
``log_softmax`` of the raw logits, before temperature, top-k and top-p (static
loop: ``F.log_softmax(logits, dim=2)`` in
``generate_all_output_tokens_static_batch``; dynamic engine:
``DynamicInferenceContext.calculate_log_probs``), it may draw padded vocabulary
ids, refuses top-k together with top-p, and stops on one termination id only.

What megatron-core's inference stack offers that this engine does not use, and why:

- Dynamic batching (``DynamicInferenceEngine``, paged KV cache): its attention
  needs flash-attn >= 2.7.3 (``transformer/attention.py``, the assertion at the
  top of ``Attention.forward``); the GPU machines this project is checked on
  cannot install it.
- CUDA graphs: with static batching megatron-core captures decode graphs only
  with flash decoding (``flash_attn_with_kvcache``; ``Attention.forward`` raises
  "CUDA graphs must use flash decode with static batching!" otherwise), and the
  dynamic engine needs flash-attn too. So no graphs here.

Batches are static: a row that stops stays in the batch (its later columns are
padding, computed and ignored) until every row has stopped; batches larger than
``max_batch_size`` run in chunks. Tensor parallelism as in the torch engine
(every rank draws; the source rank's tokens are broadcast); pipeline and
context parallelism are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from megatron.core import parallel_state

from aligner.generation.base import Engine, HFWeightBuckets, Rollouts, SamplingParams, StaleWeightsError
from aligner.generation.refit import unwrap_model
from aligner.generation.sampling import sample_as
from aligner.generation.torch_engine import TorchEngine, broadcast_from_tensor_parallel_source
from aligner.models.gpt import mask_padded_vocab

DEFAULT_MAX_BATCH_SIZE = 64


class MegatronEngine(Engine):
    """Rollouts from megatron-core's inference forward and KV cache (see the module docstring).

    It generates with ``model`` in place, as :class:`~aligner.generation.torch_engine.TorchEngine`
    does: pass the trainer's model to share its weights (a refit then only records the version),
    or a separate model to refit from Hugging Face-named buckets. Requests are checked, stops
    decided and refits done by a torch engine over the same model (``reference``), so both
    engines refuse, stop and refit alike.

    Args:
        model: a language model from :func:`aligner.models.gpt.build_model` (or a wrapper holding
            it as ``.module``) on a CUDA device, this rank's tensor-parallel shard of every layer.
        eos_token_id: the id (or ids) that end a response (stop reason ``"eos"``).
        pad_token_id: the id that fills rows after their end.
        vocab_size: the real vocabulary size; None reads the model's config.
        detokenize: token ids -> text, for ``SamplingParams.stop_strings``.
        version: the version of the weights ``model`` holds now.
        max_batch_size: rows per forward; the KV cache holds this many rows (a larger batch of
            prompts is generated in chunks of this size).
        max_sequence_length: prompt + response tokens the KV cache holds per row; None: the
            model's ``max_position_embeddings`` (needs a model from ``build_model``).
        allow_cpu: run on a CPU model (tests of this engine on machines without a GPU; there the
            torch engine is the one to use).

    Raises:
        ValueError: a model not on a CUDA device (unless ``allow_cpu``), ``max_batch_size`` or
            ``max_sequence_length`` below 1, or what :class:`TorchEngine` refuses.
        NotImplementedError: pipeline- or context-parallel size above 1, or what
            :class:`TorchEngine` refuses.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        vocab_size: int | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        version: int = 0,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_sequence_length: int | None = None,
        allow_cpu: bool = False,
    ):
        inner = unwrap_model(model)
        device = next(inner.parameters()).device
        if device.type != "cuda" and not allow_cpu:
            raise ValueError(
                f"the megatron generation engine runs on CUDA devices, but the model is on {device}: "
                "set generation.backend: torch (the built-in engine runs on any device)"
            )
        pipeline = parallel_state.get_pipeline_model_parallel_world_size()
        if pipeline > 1:
            raise NotImplementedError(
                f"the megatron generation engine does not support pipeline parallelism (pipeline size {pipeline}): "
                "set generation.backend: torch, which generates with a full-depth copy of the model"
            )
        self.reference = TorchEngine(
            inner,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            vocab_size=vocab_size,
            detokenize=detokenize,
            version=version,
        )
        if max_sequence_length is None:
            config = getattr(inner, "aligner_config", None)
            max_sequence_length = None if config is None else config.max_position_embeddings
        if max_batch_size < 1 or max_sequence_length is None or max_sequence_length < 1:
            raise ValueError(
                f"max_batch_size and max_sequence_length must be >= 1, got {max_batch_size} and {max_sequence_length}"
            )
        self.model = inner
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self._wrapper = _inference_wrapper(inner, max_batch_size, max_sequence_length)

    @property
    def version(self) -> int:
        return self.reference.version

    @property
    def last_refit_s(self) -> float:
        """Seconds the last refit took."""
        return self.reference.last_refit_s

    def kv_cache_allocated(self) -> bool:
        """Whether megatron's KV-cache buffers are allocated (after a generation or :meth:`wake`)."""
        return bool(self._wrapper.inference_context.key_value_memory_dict)

    # ------------------------------------------------------------------ sleep / wake

    def sleep(self) -> None:
        """Free the KV cache (every layer's key and value buffers) and return the freed memory to the device.

        The weights stay where they are (with shared weights, the trainer's).
        """
        self._wrapper.inference_context.key_value_memory_dict.clear()
        if next(self.model.parameters()).is_cuda:
            torch.cuda.empty_cache()

    @torch.no_grad()
    def wake(self) -> None:
        """Allocate the KV cache again, now rather than at the next generation (an out-of-memory shows here).

        megatron allocates the buffers of a layer at its first cached forward: this runs
        one forward of one token (a collective over the tensor-parallel group, like
        :meth:`generate`). A no-op while the cache is allocated.
        """
        if self.kv_cache_allocated():
            return
        device = next(self.model.parameters()).device
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        was_training = self.model.training
        try:
            self._wrapper.prep_model_for_inference()  # eval mode, context reset
            self._wrapper.run_one_forward_step({"tokens": token, "position_ids": token, "attention_mask": None})
        finally:
            self._wrapper.inference_context.reset()
            self.model.train(was_training)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        expected_version: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollouts:
        """Sample one response per prompt; see :class:`~aligner.generation.base.Rollouts` for what comes back.

        The model runs in eval mode and is put back in its former mode afterwards. A
        collective over the tensor-parallel group: all its ranks call it with the same
        prompts and sampling. ``metrics``: ``generate_s``, ``response_tokens``,
        ``tokens_per_s``, ``forwards`` and ``decode_rows`` (row-steps computed after the
        prefill, stopped rows of a static batch included). The draws come from ``generator`` when
        given, else from one seeded with ``sampling.seed``, else from torch's default one.

        Raises:
            StaleWeightsError: the weights are older than ``expected_version``, or the last refit failed.
            ValueError: no or an empty prompt, a token id outside the vocabulary, stop strings
                without ``detokenize``, a prompt plus ``max_new_tokens`` beyond the model's
                ``max_position_embeddings`` or the KV cache's ``max_sequence_length``.
        """
        self.check_version(expected_version)
        if self.reference.refit_failed:
            raise StaleWeightsError("the last refit failed partway: the weights are mixed; refit again")
        self.reference.check_request(prompts, sampling)
        longest = max(len(prompt) for prompt in prompts) + sampling.max_new_tokens
        if longest > self.max_sequence_length:
            raise ValueError(
                f"the longest prompt plus max_new_tokens is {longest} tokens, beyond the KV cache's "
                f"max_sequence_length {self.max_sequence_length} (generation.megatron_max_sequence_length)"
            )
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        if generator is None and sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        was_training = self.model.training
        try:
            chunks = [
                self._generate(prompts[first : first + self.max_batch_size], sampling, generator, device)
                for first in range(0, len(prompts), self.max_batch_size)
            ]
        finally:
            self._wrapper.inference_context.reset()
            self.model.train(was_training)
        rollouts = chunks[0] if len(chunks) == 1 else Rollouts.cat(chunks, self.reference.pad_token_id)
        seconds = time.perf_counter() - start
        response_tokens = float((rollouts.lengths - rollouts.prompt_lengths).sum())
        rollouts.metrics.update(
            generate_s=seconds, response_tokens=response_tokens, tokens_per_s=response_tokens / seconds
        )
        return rollouts

    def _generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Rollouts:
        """One static batch of at most ``max_batch_size`` rows (see the module docstring)."""
        wrapper, context = self._wrapper, self._wrapper.inference_context
        pad = self.reference.pad_token_id
        batch = len(prompts)
        prompt_sizes = [len(prompt) for prompt in prompts]
        max_len = max(prompt_sizes) + sampling.max_new_tokens
        # Made outside inference mode (the trainer may keep them for backward); the loop writes into them.
        # ``tokens`` is also the forward's input: each step's window is a slice of it.
        tokens = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        prompt_lengths = torch.tensor(prompt_sizes, dtype=torch.long, device=device)
        lengths = prompt_lengths.clone()
        logprobs = torch.zeros(batch, max_len - 1, dtype=torch.float32, device=device)
        stop_reason = [""] * batch
        responses: list[list[int]] = [[] for _ in range(batch)]
        live = set(range(batch))

        with torch.inference_mode():
            wrapper.prep_model_for_inference()  # eval mode, context reset (prefill, offset 0)
            inputs = wrapper.prep_inference_input(tokens)
            # step 1: prefill columns [0, shortest prompt); then one column per forward
            begin, end = 0, min(prompt_sizes)
            forwards = decode_rows = 0
            while live:
                window = wrapper.get_batch_for_context_window(inputs, begin, end)
                logits = wrapper.run_one_forward_step(window)[:, -1]  # [batch, padded_vocab]: column end - 1
                forwards += 1
                decode_rows += batch if begin > 0 else 0

                # step 2: rows past their prompt draw the token of column `end`
                drawing = [row for row in sorted(live) if prompt_sizes[row] <= end]
                if drawing:
                    rows = torch.tensor(drawing, dtype=torch.long, device=device)
                    row_logits = logits[rows]
                    if row_logits.shape[-1] > self.reference.vocab_size:
                        row_logits = mask_padded_vocab(row_logits, self.reference.vocab_size)
                    next_tokens, next_logprobs = sample_as(row_logits, sampling, generator=generator)
                    next_tokens = broadcast_from_tensor_parallel_source(next_tokens)
                    next_logprobs = broadcast_from_tensor_parallel_source(next_logprobs)
                    tokens[rows, end] = next_tokens
                    logprobs[rows, end - 1] = next_logprobs

                    # step 3: stops (the torch engine's rules); a stopped row's later columns stay padding
                    for row, token in zip(drawing, next_tokens.tolist(), strict=True):
                        responses[row].append(token)
                        reason = self.reference.stop_reason_of(responses[row], sampling)
                        if reason is not None:
                            stop_reason[row] = reason
                            lengths[row] = end + 1
                            live.discard(row)

                # step 4: the next forward feeds column `end` of every row
                if all(size <= end for size in prompt_sizes):
                    context.enable_decode_mode()
                begin, end = end, end + 1

        metrics = {"forwards": float(forwards), "decode_rows": float(decode_rows)}
        return Rollouts.from_buffers(
            tokens, prompt_lengths, lengths, stop_reason, logprobs, weights_version=self.version, metrics=metrics
        )

    # ------------------------------------------------------------------ refit

    def refit(self, source: torch.nn.Module, version: int) -> float:
        """Take the weights of ``source`` as version ``version``; returns the seconds it took.

        The torch engine's refit into the same model: free when ``source`` is the engine's
        model, else Hugging Face-named buckets (see :meth:`TorchEngine.refit`).

        Raises:
            ValueError: ``version`` is older than the engine's; see :meth:`refit_from_hf_buckets`.
        """
        return self.reference.refit(source, version)

    def refit_from_hf_buckets(self, buckets: HFWeightBuckets, version: int) -> float:
        """Load every weight from Hugging Face-named buckets as version ``version``; returns the seconds it took.

        The torch engine's conversion into the same model (:meth:`TorchEngine.refit_from_hf_buckets`);
        megatron's KV cache holds no weights, so nothing else changes. A failed refit makes
        :meth:`generate` refuse until one succeeds.

        Raises:
            ValueError: ``version`` is older than the engine's, a name arrives twice, or a name
                is not one of the model's.
            KeyError: the buckets ended without a tensor the model needs.
        """
        return self.reference.refit_from_hf_buckets(buckets, version)


def _inference_wrapper(model: torch.nn.Module, max_batch_size: int, max_sequence_length: int):
    """megatron's GPT inference wrapper over ``model`` with a static KV-cache context of the given size."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    config = model.config
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # pipeline micro-batching: no pipeline here
        padded_vocab_size=model.vocab_size,
        inference_max_requests=max_batch_size,
        inference_max_seq_length=max_sequence_length,
        fp32_residual_connection=config.fp32_residual_connection,
    )
    context = StaticInferenceContext(max_batch_size, max_sequence_length)
    return GPTInferenceWrapper(model, wrapper_config, context)
