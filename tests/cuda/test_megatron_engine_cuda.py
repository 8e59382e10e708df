"""The megatron generation engine on a GPU: the cases of tests/generation/test_megatron_engine.py, on CUDA.

One process on one GPU (NCCL), fp32 weights and TF32 off: tokens must equal the torch
engine's, log-probs agree within ``ENGINE_LOGPROB_ATOL`` (tests/megatron_engine_cases.py).
On a GPU, sleep() must also return the KV cache's memory (``torch.cuda.memory_allocated``
drops) and wake() take it again. CUDA graphs are not tested: megatron-core 0.16 captures
inference graphs only with flash-attn (see aligner/generation/megatron_engine.py).
"""

import megatron_engine_cases as cases
import pytest
from distributed import run_distributed


@pytest.fixture(scope="module")
def result():
    return run_distributed(cases.engine_cases_worker, 1, args=(False,), gpus=True)[0]


def test_runs_on_the_gpu(result):
    assert result["device"].startswith("cuda")


def test_greedy_equals_the_torch_engine_in_chunks(result):
    cases.check_greedy(result)


def test_sampled_with_a_seed_equals_the_torch_engine(result):
    cases.check_sampled(result)


def test_eos_stop_token_and_stop_string(result):
    cases.check_stops(result)


def test_versions_and_request_errors(result):
    cases.check_versions(result)


def test_refit_from_hugging_face_buckets(result):
    cases.check_refit(result)


def test_sleep_returns_the_kv_cache_memory_and_wake_takes_it_again(result):
    cases.check_sleep_and_wake(result, result["greedy"]["torch"])
    sleep = result["sleep"]
    # the KV cache: 2 layers x (keys, values) x 64 positions x 3 rows x 16 channels x 4 bytes = 48 KiB
    assert sleep["memory_asleep"] < sleep["memory_awake"]
    assert sleep["memory_woken"] > sleep["memory_asleep"]
