"""The CPU compatibility shim: inactive with a GPU, active and idempotent without one, undone by disable(),
lifted around a block by suspended()."""

import pytest
import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

from aligner.parallel import megatron_cpu


def _patched_objects():
    return (torch.cuda.current_device, torch.cuda.synchronize, CudaRNGStatesTracker.add, CudaRNGStatesTracker.fork)


@pytest.fixture
def shim():
    """The shim enabled for one test, always undone afterwards."""
    megatron_cpu.disable()
    yield megatron_cpu
    megatron_cpu.disable()


def test_inactive_when_a_gpu_is_present(shim, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before, modes = _patched_objects(), torch._C._len_torch_function_stack()
    assert shim.enable() is False
    assert not shim.is_enabled()
    assert _patched_objects() == before
    assert torch._C._len_torch_function_stack() == modes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim never activates on a GPU machine")
def test_active_and_idempotent_on_cpu(shim):
    before, modes = _patched_objects(), torch._C._len_torch_function_stack()
    assert shim.enable() is True
    patched = _patched_objects()
    assert shim.enable() is True  # a second call changes nothing
    assert _patched_objects() == patched
    assert torch._C._len_torch_function_stack() == modes + 1

    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2).to("cuda:0").device.type == "cpu"
    assert torch.empty(1, device=torch.device("cuda")).device.type == "cpu"
    x = torch.arange(3.0)
    assert x.cuda() is x

    shim.disable()
    assert _patched_objects() == before
    assert torch._C._len_torch_function_stack() == modes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim never activates on a GPU machine")
def test_suspended_lifts_only_the_mode_and_restores_it(shim):
    modes = torch._C._len_torch_function_stack()
    with shim.suspended():  # not enabled: nothing to lift
        assert torch._C._len_torch_function_stack() == modes
    shim.enable()
    with shim.suspended():
        assert torch._C._len_torch_function_stack() == modes
        assert torch.cuda.current_device() == "cpu"  # the plain patches stay
        with pytest.raises(RuntimeError):
            torch.ones(1, device="cuda")
    assert torch._C._len_torch_function_stack() == modes + 1
    assert torch.ones(1, device="cuda").device.type == "cpu"
    with pytest.raises(ValueError, match="inside"), shim.suspended():
        raise ValueError("inside")
    assert torch.ones(1, device="cuda").device.type == "cpu", "restored after an exception"


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim never activates on a GPU machine")
def test_suspended_leaves_the_shim_under_a_later_mode(shim):
    shim.enable()
    with _PassThroughMode(), shim.suspended():
        assert torch.ones(1, device="cuda").device.type == "cpu"  # still routed through the shim
    assert torch.ones(1, device="cuda").device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim never activates on a GPU machine")
def test_rng_tracker_streams_on_cpu(shim):
    shim.enable()
    tracker = CudaRNGStatesTracker()
    tracker.add("stream", 7)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 7)

    torch.manual_seed(0)
    outer = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        first = torch.rand(4)
    with tracker.fork("stream"):
        second = torch.rand(4)
    after = torch.rand(4)

    stream = torch.Generator().manual_seed(7)
    torch.testing.assert_close(first, torch.rand(4, generator=stream), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.rand(4, generator=stream), rtol=0, atol=0)  # the stream continues
    torch.testing.assert_close(after, outer, rtol=0, atol=0)  # the default stream is untouched
    with pytest.raises(Exception, match="is not added"), tracker.fork("missing"):
        pass
