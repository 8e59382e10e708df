"""The megatron generation engine (aligner.generation.megatron_engine) on the CPU, and its config.

megatron-core's static inference path (its inference wrapper, KV-cache context and the
model's cached attention) runs on the CPU under aligner's megatron CPU shim, so the engine's
loop is checked here against the torch engine (``allow_cpu=True``; a user on a CPU is sent to
the torch backend). The same cases run on a GPU in tests/cuda/test_megatron_engine_cuda.py.
"""

import megatron_engine_cases as cases
import pytest
import torch
from distributed import run_distributed

from aligner.config import ConfigError
from aligner.generation.config import BACKENDS, GenerationConfig


def test_config_accepts_the_megatron_backend():
    config = GenerationConfig(backend="megatron", megatron_max_batch_size=8, megatron_max_sequence_length=512)
    assert "megatron" in BACKENDS and config.backend == "megatron"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "vllm"}, r"generation.backend must be one of \('torch', 'megatron'\), got 'vllm'"),
        ({"megatron_max_batch_size": 0}, "generation.megatron_max_batch_size must be >= 1"),
        ({"megatron_max_sequence_length": 64, "max_new_tokens": 64}, "generation.megatron_max_sequence_length"),
    ],
)
def test_config_refuses_bad_values_naming_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**kwargs)


def test_module_imports_on_a_machine_without_a_gpu():
    import aligner.generation.megatron_engine as megatron_engine

    assert not torch.cuda.is_available() or pytest.skip("this machine has a GPU")
    assert issubclass(megatron_engine.MegatronEngine, megatron_engine.Engine)


def test_a_cpu_model_is_refused_naming_the_torch_backend():
    from aligner.generation.megatron_engine import MegatronEngine

    with pytest.raises(ValueError, match="runs on CUDA devices.*set generation.backend: torch"):
        MegatronEngine(torch.nn.Linear(2, 2), eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def result():
    return run_distributed(cases.engine_cases_worker, 1, args=(True,))[0]


@pytest.mark.slow
def test_runs_on_the_cpu(result):
    assert result["device"] == "cpu"


@pytest.mark.slow
def test_greedy_equals_the_torch_engine_in_chunks(result):
    cases.check_greedy(result)


@pytest.mark.slow
def test_sampled_with_a_seed_equals_the_torch_engine(result):
    cases.check_sampled(result)


@pytest.mark.slow
def test_eos_stop_token_and_stop_string(result):
    cases.check_stops(result)


@pytest.mark.slow
def test_versions_and_request_errors(result):
    cases.check_versions(result)


@pytest.mark.slow
def test_refit_from_hugging_face_buckets(result):
    cases.check_refit(result)


@pytest.mark.slow
def test_sleep_frees_the_kv_cache_and_wake_brings_it_back(result):
    cases.check_sleep_and_wake(result, result["greedy"]["torch"])
