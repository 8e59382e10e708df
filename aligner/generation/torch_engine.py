"""The built-in generation engine: batched, KV-cached sampling from a megatron-core GPTModel in plain torch.

    engine = TorchEngine(model, eos_token_id=2, pad_token_id=0, detokenize=tokenizer.decode)
    rollouts = engine.generate([[5, 9, 2], [7]], SamplingParams(max_new_tokens=16, temperature=0.7, seed=1))
    engine.refit(actor, version=1)        # the trainer's own model: a no-op that records the version

It runs anywhere megatron-core does (CPU with gloo, GPU), and is the reference
the faster engines are checked against.

How a batch is generated:

1. Prefill: the prompts, right-padded, go through the model in one forward
   (causal attention, and no row attends to its padding), filling the KV
   cache and giving each row's first token from the logits at its last
   prompt token.
2. Decode: each later forward feeds one token per live row. The cache keeps a
   slot per row and position, so a row's tokens sit at their own positions
   ``0, 1, ...`` (RoPE sees exactly the positions the row would see alone)
   and each row attends to its own length only.
3. Compaction: a row that draws a stop (eos, a stop token, a stop string) or
   reaches ``max_new_tokens`` leaves the batch and the cache at once, so the
   following forwards cost what the live rows cost.

The forward runs megatron's layer in eval mode, in its order and dtypes, on
the model's own parameters: the embedding and the norms are the model's
modules; the projections are plain products with the layers' weights (on CPU
``(W @ x.T).T``, the shape MKL runs fastest for a decode step's few rows) with
megatron's tensor-parallel reductions and bias handling; RoPE is megatron's
formula with the angles' cosine and sine computed once per generation; the
attention is ``scaled_dot_product_attention`` over the cached keys and values.
What this loop does not reproduce (interleaved RoPE, a projection other than
megatron's local linear layers, ...) is refused at construction. Tests hold it
to the full forward of the model without a cache.

Tensor parallelism: every rank of the tensor-parallel group runs the same
forward on the same prompts (the projections exchange what megatron's
parallel layers exchange); the logits are gathered to the full vocabulary,
padding columns are masked, every rank draws, and the tensor-parallel source
rank's tokens and log-probs are broadcast so the ranks never diverge (seed the
draws alike on every rank to keep their generators in step too).

Pipeline parallelism: the engine's model holds every layer. With a trainer at
pipeline size above 1, each rank generates with a full-depth copy of the model
(:func:`aligner.generation.refit.build_engine_model`, refit from the trainer's
stages), every pipeline stage runs the same generation, and the first stage's
rollouts are broadcast over the pipeline group, so every stage of the trainer
gets the same batch. A model that holds one pipeline stage is refused. Context
parallelism is not supported.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from aligner.generation.base import (
    Engine,
    HFWeightBuckets,
    Rollouts,
    SamplingParams,
    StaleWeightsError,
    ends_with_stop_string,
)
from aligner.generation.refit import hf_weight_buckets, unwrap_model
from aligner.generation.sampling import sample_as
from aligner.models.config import ModelConfig
from aligner.models.gpt import mask_padded_vocab
from aligner.ops.greedy import linear_greedy, uses_fused_kernel
from aligner.parallel import megatron_cpu

log = logging.getLogger(__name__)


def _check_parallel(model: torch.nn.Module) -> None:
    """Refuse context parallelism and a model that holds one pipeline stage (the engine runs every layer)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        raise NotImplementedError(
            f"the torch generation engine does not support context parallelism; got context-parallel size {cp}: "
            "generate with a cp=1 model"
        )
    layers, num_layers = len(model.decoder.layers), model.config.num_layers
    if not (model.pre_process and model.post_process) or layers != num_layers:
        raise NotImplementedError(
            f"the torch generation engine needs every layer, but this model is one pipeline stage ({layers} of "
            f"{num_layers} layers, pre_process={model.pre_process}, post_process={model.post_process}): build a "
            "full-depth copy with aligner.generation.refit.build_engine_model(model) and refit it from the model"
        )


def _check_layout(model: torch.nn.Module) -> None:
    """Refuse what the engine's layer loop does not reproduce (it is the plain pre-norm RoPE decoder)."""
    config = model.config
    unsupported = {
        "position_embedding_type != 'rope'": model.position_embedding_type != "rope",
        "multi_latent_attention": config.multi_latent_attention,
        "rotary_interleaved": config.rotary_interleaved,
        "attention_output_gate": config.attention_output_gate,
        "softmax_type != 'vanilla'": config.softmax_type != "vanilla",
        "window_size": config.window_size is not None,
        "apply_residual_connection_post_layernorm": config.apply_residual_connection_post_layernorm,
        "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        "sequence_parallel": config.sequence_parallel,
        "mtp_num_layers": bool(config.mtp_num_layers),
    }
    found = [name for name, present in unsupported.items() if present]
    # The decode step multiplies by the projections' weights itself: megatron's local linear layers
    # (a Transformer Engine layer may fold the norm into the projection).
    for index, layer in enumerate(model.decoder.layers):
        linears = {
            "linear_qkv": (layer.self_attention.linear_qkv, ColumnParallelLinear),
            "linear_proj": (layer.self_attention.linear_proj, RowParallelLinear),
            "linear_fc1": (layer.mlp.linear_fc1, ColumnParallelLinear),
            "linear_fc2": (layer.mlp.linear_fc2, RowParallelLinear),
        }
        found += [
            f"layer {index}'s {name} of type {type(module).__name__} (megatron's local {kind.__name__} expected)"
            for name, (module, kind) in linears.items()
            if type(module) is not kind
        ]
    if found:
        raise NotImplementedError(f"the torch generation engine does not support {found}")


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} hold(s) token id(s) {bad[:8]} outside [0, {vocab_size}) (the vocabulary)")


def broadcast_from_tensor_parallel_source(tensor: Tensor) -> Tensor:
    """The tensor-parallel source rank's ``tensor`` on every rank of its group (in place)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(
            tensor,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    return tensor


def _rollouts_from_first_pipeline_stage(rollouts: Rollouts) -> Rollouts:
    """The first pipeline stage's ``rollouts`` on every rank of its pipeline group.

    Every stage generates alike from the same weights; the broadcast keeps them one batch
    (which the trainer's stages need) even where the device's kernels are not bit-reproducible.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return rollouts
    device = rollouts.tokens.device
    tensors = [name for name, value in vars(rollouts).items() if isinstance(value, Tensor)]
    payload = [dataclasses.replace(rollouts, **{name: getattr(rollouts, name).cpu() for name in tensors})]
    dist.broadcast_object_list(
        payload,
        src=parallel_state.get_pipeline_model_parallel_first_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    first = payload[0]
    return dataclasses.replace(first, **{name: getattr(first, name).to(device) for name in tensors})


def _matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for ``x`` ``[n, in]`` and ``weight`` ``[out, in]``: ``[n, out]``, maybe a transposed view.

    On CPU it is formed as ``(weight @ x.T).T``: for the few rows of a decode step and a wide
    weight MKL runs that shape at up to 3x the speed of ``x @ weight.T`` (e.g. 6.2 vs 10.7 ms for
    32 rows against a ``[32768, 256]`` output layer; see bench/RESULTS.md), and a single row is
    doubled because its matrix-vector product runs on one thread. Each output element is still
    one dot product of a row of ``x`` with a row of ``weight``, in float32 here as in megatron.
    """
    if x.device.type != "cpu":
        return x @ weight.T
    if x.shape[0] == 1:
        return (weight @ x.repeat(2, 1).T)[:, :1].T
    return (weight @ x.T).T


def _linear(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Megatron's ``(output, bias)`` of a column- or row-parallel linear on ``x`` ``[..., in]``, in eval mode.

    The product is :func:`_matmul`; a row-parallel layer sums its partial products over the
    tensor-parallel group (megatron's forward reduction). As in megatron, the bias is added here
    unless the layer skips it, in which case it is returned for the caller to add.
    """
    shape = x.shape
    output = _matmul(x.reshape(-1, shape[-1]), module.weight)
    if isinstance(module, RowParallelLinear) and parallel_state.get_tensor_model_parallel_world_size() > 1:
        output = output.contiguous()
        dist.all_reduce(output, group=parallel_state.get_tensor_model_parallel_group())
    output = output.view(*shape[:-1], output.shape[-1])
    bias = module.bias
    if bias is not None and not module.skip_bias_add:
        return output + bias, None
    return output, bias


def _residual_add(residual: Tensor, output_and_bias: tuple[Tensor, Tensor | None]) -> Tensor:
    """Megatron's bias-dropout-add in eval mode: ``residual + (output + bias)``."""
    output, bias = output_and_bias
    if bias is not None:
        output = output + bias
    return residual + output


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Megatron's (non-interleaved) RoPE of ``x`` ``[..., head_dim]`` with ``cos``/``sin`` ``[..., rot_dim]``.

    ``x * cos + rotate_half(x) * sin`` on the first ``rot_dim`` features, the rest passed through,
    the operations of ``megatron.core.models.common.embeddings.rope_utils`` with the angles'
    cosine and sine computed once per generation instead of per layer.
    """
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    first, second = torch.chunk(rotated, 2, dim=-1)
    rotated = (rotated * cos) + (torch.cat((-second, first), dim=-1) * sin)
    return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)


def _activation(config, x: Tensor) -> Tensor:
    """Megatron's MLP activation in its unfused form: the gated linear unit (with its clamp and offset) or not."""
    if not config.gated_linear_unit:
        return config.activation_func(x)
    gate, linear = torch.chunk(x, 2, dim=-1)
    if (clamp := config.activation_func_clamp_value) is not None:
        gate = gate.clamp(min=None, max=clamp)
        linear = linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(gate) * (linear + config.glu_linear_offset)


def _convert_part(
    pending: dict[str, Tensor], config: ModelConfig, layers: list[int], ends: bool
) -> tuple[dict[str, Tensor], set[str]] | None:
    """Megatron tensors of ``layers`` (and of the embedding, final norm and head when ``ends``) from the
    Hugging Face tensors in ``pending``, with the names it used; None while one is missing."""
    from aligner.models.hf import hf_to_megatron

    used: set[str] = set()

    def get(name: str) -> Tensor:
        used.add(name)
        return pending[name]

    try:
        return hf_to_megatron(get, config, layers, first_stage=ends, last_stage=ends), used
    except KeyError:
        return None


class _KVCache:
    """Every layer's keys and values, ``[batch, kv_heads, max_len, head_dim]``: one slot per row and position.

    A layer's buffers are made at its first write, in the dtype of its keys and values.
    """

    def __init__(self, layers: int, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.keys: list[Tensor | None] = [None] * layers
        self.values: list[Tensor | None] = [None] * layers

    def write(self, layer: int, key: Tensor, value: Tensor, positions: Tensor) -> None:
        """Store ``key``/``value`` ``[seq, batch, kv_heads, head_dim]`` at ``positions`` ``[batch, seq]``."""
        seq, batch, heads, dim = key.shape
        if self.keys[layer] is None:
            # Zeros, not empty memory: attention multiplies the values of masked-out slots by a
            # probability of 0, and 0 * (NaN left in uninitialized memory) would be NaN.
            self.keys[layer] = key.new_zeros((self.batch, heads, self.max_len, dim))
            self.values[layer] = value.new_zeros((self.batch, heads, self.max_len, dim))
        if seq == 1:  # a decode step: one position per row
            rows = torch.arange(batch, device=key.device)
            self.keys[layer][rows, :, positions[:, 0]] = key[0]
            self.values[layer][rows, :, positions[:, 0]] = value[0]
            return
        index = positions[:, None, :, None].expand(batch, heads, seq, dim)
        self.keys[layer].scatter_(2, index, key.permute(1, 2, 0, 3))
        self.values[layer].scatter_(2, index, value.permute(1, 2, 0, 3))

    def read(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``[0, length)``, ``[batch, kv_heads, length, head_dim]`` each."""
        return self.keys[layer][:, :, :length], self.values[layer][:, :, :length]

    def keep(self, rows: Tensor, length: int) -> None:
        """Drop every batch row not in ``rows`` (kept in that order); positions past ``length`` are not copied."""
        self.batch = len(rows)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = old.new_zeros((len(rows), *old.shape[1:]))
                new[:, :, :length] = old[rows, :, :length]
                store[layer] = new


class TorchEngine(Engine):
    """The built-in engine over a megatron-core GPTModel shard (see the module docstring).

    Args:
        model: a language model from :func:`aligner.models.gpt.build_model` (or a
            wrapper holding it as ``.module``), this rank's tensor-parallel shard
            of every layer. The engine generates with it in place: pass the
            trainer's model to share its weights (refit is then free), or a
            separate model to refit from Hugging Face-named buckets (with a
            pipeline-parallel trainer, :func:`aligner.generation.refit.build_engine_model`).
        eos_token_id: the id (or ids) that end a response (stop reason ``"eos"``);
            an empty list never stops early on its own.
        pad_token_id: the id that fills rows after their end.
        vocab_size: the real vocabulary size (ids at or beyond it are never drawn);
            None reads the model's config.
        detokenize: token ids -> text, for ``SamplingParams.stop_strings``
            (e.g. ``tokenizer.decode``).
        version: the version of the weights ``model`` holds now.

    Attributes:
        last_refit_s: seconds the last refit took.
        refit_failed: the last refit stopped partway (the weights are mixed); generating is refused until
            a refit succeeds.

    Raises:
        ValueError: a value model, a model not from ``build_model`` without ``vocab_size``,
            an eos or pad id outside the vocabulary.
        NotImplementedError: context-parallel size above 1, a model that holds one pipeline
            stage, or a model feature the engine's layer loop does not reproduce.
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
    ):
        inner = unwrap_model(model)
        _check_parallel(inner)
        if getattr(inner, "aligner_num_value_outputs", None) is not None:
            raise ValueError("generation needs a language model; this one was built with num_value_outputs")
        config = getattr(inner, "aligner_config", None)
        if vocab_size is None:
            if config is None:
                raise ValueError("pass vocab_size: the model was not built by aligner.models.gpt.build_model")
            vocab_size = config.vocab_size
        _check_layout(inner)
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        _check_ids("eos_token_id", eos_ids, vocab_size)
        _check_ids("pad_token_id", [pad_token_id], vocab_size)
        self.model = inner
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_ids)
        self.pad_token_id = pad_token_id
        self.detokenize = detokenize
        self.last_refit_s = 0.0
        self._version = version
        self.refit_failed = False

    @property
    def version(self) -> int:
        return self._version

    def sleep(self) -> None:
        """Return freed cached GPU memory to the device; nothing else to release.

        The engine keeps no KV cache between calls and shares or owns only its model's
        weights, which stay where they are.
        """
        if next(self.model.parameters()).is_cuda:
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to restore: :meth:`sleep` moved nothing."""

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

        The model runs in eval mode (no dropout) and is put back in its former
        mode afterwards. A collective over the tensor- and pipeline-parallel
        groups: all their ranks call it with the same prompts and sampling.

        Args:
            prompts: ``B`` non-empty lists of token ids, of any lengths.
            sampling: how to draw.
            expected_version: the weights version the caller requires (None: any).
            generator: the random stream of the draws, instead of one seeded by ``sampling.seed``.

        Raises:
            StaleWeightsError: the weights are older than ``expected_version``, or the last refit failed.
            ValueError: no or an empty prompt, a token id outside the vocabulary, a prompt
                plus ``max_new_tokens`` beyond the model's ``max_position_embeddings``,
                stop strings without ``detokenize``.
        """
        self.check_version(expected_version)
        if self.refit_failed:
            raise StaleWeightsError("the last refit failed partway: the weights are mixed; refit again")
        self.check_request(prompts, sampling)
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        if generator is None and sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            rollouts = self._generate(prompts, sampling, generator, device)
        finally:
            self.model.train(was_training)
        rollouts = _rollouts_from_first_pipeline_stage(rollouts)
        seconds = time.perf_counter() - start
        response_tokens = float((rollouts.lengths - rollouts.prompt_lengths).sum())
        rollouts.metrics.update(
            generate_s=seconds, response_tokens=response_tokens, tokens_per_s=response_tokens / seconds
        )
        return rollouts

    def check_request(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> None:
        """Raise the ``ValueError`` :meth:`generate` documents for a bad request (other engines reuse it)."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        for index, prompt in enumerate(prompts):
            _check_ids(f"prompts[{index}]", prompt, self.vocab_size)
        _check_ids("stop_token_ids", sampling.stop_token_ids, self.vocab_size)
        if sampling.stop_strings and self.detokenize is None:
            raise ValueError("stop_strings need a detokenize function: build the engine with detokenize=...")
        longest = max(len(prompt) for prompt in prompts) + sampling.max_new_tokens
        limit = self.model.aligner_config.max_position_embeddings if hasattr(self.model, "aligner_config") else None
        if limit is not None and longest > limit:
            raise ValueError(
                f"the longest prompt plus max_new_tokens is {longest} tokens, beyond the model's "
                f"max_position_embeddings {limit}"
            )

    def _generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Rollouts:
        batch = len(prompts)
        prompt_sizes = [len(prompt) for prompt in prompts]
        longest_prompt = max(prompt_sizes)
        max_len = longest_prompt + sampling.max_new_tokens
        # The results are made outside inference mode (the trainer may write to them or save them for
        # backward); the loop below only writes into them.
        tokens = torch.full((batch, max_len), self.pad_token_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        prompt_lengths = torch.tensor(prompt_sizes, dtype=torch.long, device=device)
        lengths = prompt_lengths.clone()
        logprobs = torch.zeros(batch, max_len - 1, dtype=torch.float32, device=device)
        stop_reason = [""] * batch
        responses: list[list[int]] = [[] for _ in range(batch)]  # each row's response so far

        # The CPU shim's torch-function mode is lifted: nothing here names a cuda device, and the mode
        # would route each of the loop's many small torch calls through Python.
        with megatron_cpu.suspended(), torch.inference_mode():
            cache = _KVCache(len(self.model.decoder.layers), batch, max_len)
            # [max_len, 1, rot_dim]: megatron's RoPE angles of positions 0..max_len-1 (rope scaling included)
            freqs = self.model.rotary_pos_emb(max_len)[:, 0]
            dtype = self.model.embedding.word_embeddings.weight.dtype
            rope = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))

            # step 1: prefill, right-padded; row b attends causally to its first prompt_lengths[b] tokens
            positions = torch.arange(longest_prompt, device=device).expand(batch, -1)
            mask = None
            if min(prompt_sizes) < longest_prompt:
                key_valid = positions < prompt_lengths[:, None]  # [B, P]
                mask = torch.ones(longest_prompt, longest_prompt, dtype=torch.bool, device=device).tril()
                mask = mask[None, None] & key_valid[:, None, None, :]
            hidden = self._forward(
                tokens[:, :longest_prompt], positions, longest_prompt, rope, cache, mask, last=prompt_lengths - 1
            )
            forwards, decode_rows = 1, 0

            # The live rows: their original rows, and their lengths so far on the device and on the host
            # (the host copy sizes the attention without a device sync).
            rows = torch.arange(batch, device=device)
            row_list = list(range(batch))
            live_lengths = prompt_lengths.clone()
            host_lengths = list(prompt_sizes)
            while True:
                # step 2: draw one token per live row and record it
                next_tokens, next_logprobs = self._draw(hidden, sampling, generator)
                next_tokens = broadcast_from_tensor_parallel_source(next_tokens)
                next_logprobs = broadcast_from_tensor_parallel_source(next_logprobs)
                tokens[rows, live_lengths] = next_tokens
                logprobs[rows, live_lengths - 1] = next_logprobs
                live_lengths += 1
                host_lengths = [length + 1 for length in host_lengths]

                # step 3: stop rows and drop them from the batch and the cache
                keep = []
                for index, (row, token) in enumerate(zip(row_list, next_tokens.tolist(), strict=True)):
                    responses[row].append(token)
                    reason = self.stop_reason_of(responses[row], sampling)
                    if reason is None:
                        keep.append(index)
                    else:
                        stop_reason[row] = reason
                        lengths[row] = host_lengths[index]
                if not keep:
                    break
                if len(keep) < len(row_list):
                    kept = torch.tensor(keep, dtype=torch.long, device=device)
                    rows, next_tokens, live_lengths = rows[kept], next_tokens[kept], live_lengths[kept]
                    row_list = [row_list[index] for index in keep]
                    host_lengths = [host_lengths[index] for index in keep]
                    cache.keep(kept, max(host_lengths) - 1)

                # step 4: decode one position per live row, each at its own position
                positions = (live_lengths - 1)[:, None]  # [b, 1]: where the token just drawn goes
                length = max(host_lengths)
                mask = None
                if min(host_lengths) < length:
                    mask = (torch.arange(length, device=device) <= positions)[:, None, None, :]  # [b, 1, 1, L]
                hidden = self._forward(next_tokens[:, None], positions, length, rope, cache, mask)
                forwards += 1
                decode_rows += len(row_list)

        metrics = {"forwards": float(forwards), "decode_rows": float(decode_rows)}
        return Rollouts.from_buffers(
            tokens, prompt_lengths, lengths, stop_reason, logprobs, weights_version=self._version, metrics=metrics
        )

    def stop_reason_of(self, response: list[int], sampling: SamplingParams) -> str | None:
        """Why a row whose response is now ``response`` stops, or None if it goes on.

        Asked after every token of the row. Stop strings are matched on the decoded text across
        token boundaries, decoding only the response's tail (:func:`~aligner.generation.base.ends_with_stop_string`).
        """
        token = response[-1]
        if token in self.eos_token_ids:
            return "eos"
        if token in sampling.stop_token_ids:
            return "stop_token"
        if sampling.stop_strings and ends_with_stop_string(response, sampling.stop_strings, self.detokenize):
            return "stop_string"
        if len(response) >= sampling.max_new_tokens:
            return "length"
        return None

    def _forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        length: int,
        rope: tuple[Tensor, Tensor],
        cache: _KVCache,
        mask: Tensor | None,
        last: Tensor | None = None,
    ) -> Tensor:
        """The final-normed hidden state ``[b, hidden]`` of each row's last position after feeding ``input_ids``.

        Args:
            input_ids: ``[b, s]`` tokens, at ``positions`` ``[b, s]`` of their rows.
            length: ``max(positions) + 1``, the cache positions attention reads.
            rope: ``cos`` and ``sin`` of megatron's RoPE angles by position, ``[max_len, 1, rot_dim]`` each.
            cache: written at ``positions``; attention reads positions ``0..length - 1``.
            mask: ``[b, 1, s, L]`` bool, True where a query may attend a key; None: causal when
                ``s > 1``, everything when ``s == 1``.
            last: ``[b]`` index into ``s`` of the position whose state to return; None: the last.
        """
        model = self.model
        batch = input_ids.shape[0]
        hidden = model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, hidden]
        cos, sin = (table[positions.T] for table in rope)  # [s, b, 1, rot_dim], shared by every layer
        for index, layer in enumerate(model.decoder.layers):
            hidden = self._layer(index, layer, hidden, positions, length, cos, sin, cache, mask)
        hidden = hidden[-1] if last is None else hidden[last, torch.arange(batch, device=hidden.device)]
        return model.decoder.final_layernorm(hidden)

    def _draw(
        self, hidden: Tensor, sampling: SamplingParams, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """The next token of each row and its log-prob as drawn, from the final-normed ``hidden`` ``[b, hidden]``.

        Greedy on a single-rank CPU float32 head without a bias goes through the fused
        :func:`aligner.ops.linear_greedy` over the real vocabulary's rows (the padding rows sliced
        off): the same argmax and log-softmax as the logits path, without forming the ``[b, V]``
        logits. Everything else forms the logits (:meth:`_head`) and samples from them.
        """
        weight = self._fused_greedy_weight(hidden) if sampling.greedy else None
        if weight is not None:
            return linear_greedy(hidden, weight[: self.vocab_size])
        logits = self._head(hidden)
        if logits.shape[-1] > self.vocab_size:
            logits = mask_padded_vocab(logits, self.vocab_size)
        return sample_as(logits, sampling, generator=generator)

    def _fused_greedy_weight(self, hidden: Tensor) -> Tensor | None:
        """The output weight ``[padded_vocab, hidden]`` if :func:`linear_greedy` can run the head, else None."""
        model = self.model
        if parallel_state.get_tensor_model_parallel_world_size() > 1 or model.output_layer.bias is not None:
            return None
        if not uses_fused_kernel(hidden):
            return None
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        return model.output_layer.weight if weight is None else weight

    def _layer(
        self,
        index: int,
        layer: torch.nn.Module,
        hidden: Tensor,
        positions: Tensor,
        length: int,
        cos: Tensor,
        sin: Tensor,
        cache: _KVCache,
        mask: Tensor | None,
    ) -> Tensor:
        """One transformer layer over ``hidden`` ``[s, b, hidden]`` with its keys and values cached.

        The operations of megatron's ``TransformerLayer`` in eval mode, in its order and dtypes, on
        the layer's own norms and weights; the projections are plain products (:func:`_linear`)
        with megatron's tensor-parallel reductions.
        """
        attention = layer.self_attention
        seq, batch = hidden.shape[:2]
        heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
        groups = attention.num_query_groups_per_partition
        per_group = heads // groups
        normed = layer.input_layernorm(hidden)
        if attention.config.num_query_groups < parallel_state.get_tensor_model_parallel_world_size():
            # query groups split over ranks: megatron's own gather-and-slice
            query, key, value = attention.get_query_key_value_tensors(normed)
            query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        else:
            # [s, b, ng * (np/ng + 2) * hn] -> per group: np/ng query heads, a key, a value
            mixed, bias = _linear(attention.linear_qkv, normed)
            if bias is not None:
                mixed = mixed + bias
            mixed = mixed.view(seq, batch, groups, per_group + 2, head_dim)
            if attention.q_layernorm is None and attention.k_layernorm is None:
                rotated = _rope(mixed[:, :, :, : per_group + 1], cos[:, :, :, None], sin[:, :, :, None])
                query = rotated[:, :, :, :per_group].reshape(seq, batch, heads, head_dim)
                key = rotated[:, :, :, per_group]
            else:
                query = mixed[:, :, :, :per_group].reshape(seq, batch, heads, head_dim)
                key = mixed[:, :, :, per_group]
                if attention.q_layernorm is not None:
                    query = attention.q_layernorm(query)
                if attention.k_layernorm is not None:
                    key = attention.k_layernorm(key)
                query, key = _rope(query, cos, sin), _rope(key, cos, sin)
            value = mixed[:, :, :, per_group + 1]
        cache.write(index, key, value, positions)
        keys, values = cache.read(index, length)
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),  # [b, heads, s, head_dim]
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and seq > 1,
            scale=attention.core_attention.softmax_scale,
            enable_gqa=True,
        )
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
        hidden = _residual_add(hidden, _linear(attention.linear_proj, context))
        mlp = layer.mlp
        intermediate, bias = _linear(mlp.linear_fc1, layer.pre_mlp_layernorm(hidden))
        if bias is not None:
            intermediate = intermediate + bias
        return _residual_add(hidden, _linear(mlp.linear_fc2, _activation(mlp.config, intermediate)))

    def _head(self, hidden: Tensor) -> Tensor:
        """Logits ``[b, padded_vocab]`` of final-normed ``hidden`` ``[b, hidden]``, gathered over TP ranks."""
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits, _ = model.output_layer(hidden[None], weight=weight, runtime_gather_output=True)
            return logits[0]
        logits = _matmul(hidden, model.output_layer.weight if weight is None else weight)
        if model.output_layer.bias is not None:
            logits = logits + model.output_layer.bias
        # rows in memory order: the sampler's per-row passes over the vocabulary run at twice the speed
        return logits.contiguous()

    # ------------------------------------------------------------------ refit

    def _check_new_version(self, version: int) -> None:
        if version < self._version:
            raise ValueError(f"refit to version {version} is older than the engine's weights (version {self._version})")

    def refit(self, source: torch.nn.Module, version: int) -> float:
        """Take the weights of ``source`` as version ``version``; returns the seconds it took.

        When the engine generates with ``source`` itself (the trainer's model
        object, wrappers aside), the weights are already there: only the version
        changes. Otherwise ``source``'s weights travel as Hugging Face-named
        buckets (:func:`aligner.generation.refit.hf_weight_buckets`, a collective
        over the tensor- and pipeline-parallel groups, so a pipeline-parallel
        trainer's stages all send) into :meth:`refit_from_hf_buckets`.

        Raises:
            ValueError: ``version`` is older than the engine's; see :meth:`refit_from_hf_buckets`.
        """
        self._check_new_version(version)
        if unwrap_model(source) is not self.model:
            return self.refit_from_hf_buckets(hf_weight_buckets(source), version)
        self._version = version
        self.last_refit_s = 0.0
        log.debug("refit to version %d: shares the trainer's weights, nothing to copy", version)
        return 0.0

    @torch.no_grad()
    def refit_from_hf_buckets(self, buckets: HFWeightBuckets, version: int) -> float:
        """Load every weight from Hugging Face-named buckets as version ``version``; returns the seconds it took.

        Each bucket's tensors are converted to megatron's layout with
        :func:`aligner.models.hf.hf_to_megatron` (the import/export mapping) as
        soon as all the tensors of one layer (or of the embedding, final norm and
        head together) have arrived, in any order, and the Hugging Face tensors
        are dropped; the converted model (one full copy) is then loaded into this
        rank's shard with :func:`aligner.models.sharding.load_full_state_dict`.
        If anything fails after the version check, the engine refuses to generate
        until a refit succeeds.

        Raises:
            ValueError: ``version`` is older than the engine's, a name arrives twice, or
                a name is not one of the model's.
            KeyError: the buckets ended without a tensor the model needs.
        """
        from aligner.models.sharding import load_full_state_dict

        self._check_new_version(version)
        start = time.perf_counter()
        config = self.model.aligner_config
        # Parts converted as one: each layer, and the embedding with the final norm and head
        # (a tied head needs the embedding too).
        parts: dict[str, tuple[list[int], bool]] = {f"layer {i}": ([i], False) for i in range(config.num_layers)}
        parts["embedding and head"] = ([], True)
        arrived: set[str] = set()
        pending: dict[str, Tensor] = {}  # arrived, not converted yet
        converted: dict[str, Tensor] = {}
        self.refit_failed = True
        for bucket in buckets:
            for name, tensor in bucket:
                if name in arrived:
                    raise ValueError(f"refit: {name} arrived twice")
                arrived.add(name)
                pending[name] = tensor
            for part, (layers, ends) in list(parts.items()):
                done = _convert_part(pending, config, layers, ends)
                if done is not None:
                    megatron_tensors, used = done
                    converted.update(megatron_tensors)
                    for name in used:
                        del pending[name]
                    del parts[part]
        if parts:
            missing = sorted(parts)
            raise KeyError(f"refit: the buckets ended before every weight of {missing} arrived")
        if pending:
            raise ValueError(f"refit: tensors with no place in the model: {sorted(pending)[:8]}")
        load_full_state_dict(self.model, converted)
        self.refit_failed = False
        self._version = version
        self.last_refit_s = time.perf_counter() - start
        log.info("refit to version %d from Hugging Face buckets: %.3f s", version, self.last_refit_s)
        return self.last_refit_s


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Rollouts:
    """One batch from a :class:`TorchEngine` over ``model``, for one-off generation (evaluation, SteerLM).

    The same as ``TorchEngine(model, eos_token_id=..., pad_token_id=..., vocab_size=...)
    .generate(prompts, SamplingParams(...), generator=generator)``; see there for
    the arguments, the result and the errors.
    """
    engine = TorchEngine(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=vocab_size)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    return engine.generate(prompts, sampling, generator=generator)
