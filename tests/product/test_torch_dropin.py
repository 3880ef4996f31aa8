"""The torch drop-in: `from_torch` gives a module that stands in for the original, and
`torch.compile(model, backend="cbir_engine")` runs the zoo's networks in the engine."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cbir_engine  # noqa: E402
from cbir_engine.models import build, randomize_batchnorm  # noqa: E402
from cbir_engine.torch_backend import EngineModule  # noqa: E402


def _rel(a, b) -> float:  # type: ignore[no-untyped-def]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _small_net():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return randomize_batchnorm(net, 2).eval()


def test_from_torch_behaves_like_the_module():
    net = _small_net()
    m = cbir_engine.from_torch(net, torch.zeros(1, 3, 16, 16), threads=1)
    assert isinstance(m, torch.nn.Module) and isinstance(m, EngineModule)
    assert m.eval() is m and not m.training
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    y = m(x)
    assert isinstance(y, torch.Tensor) and y.device == x.device and y.dtype == torch.float32
    assert _rel(y, ref) <= 1e-5
    y_np = m(x.numpy())  # numpy in, numpy out
    assert isinstance(y_np, np.ndarray) and _rel(y_np, ref) <= 1e-5
    # The Engine's own API is still there.
    assert m.input_names == ["input"] and "Conv" in m.summary()
    # Training mode runs the original module, so gradients reach its parameters.
    m.train()
    assert net.training
    loss = m(x).pow(2).sum()
    loss.backward()
    assert net[0].weight.grad is not None and float(net[0].weight.grad.abs().sum()) > 0
    m.eval()
    assert not net.training and m(x).grad_fn is None


def test_from_torch_output_follows_the_input_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for a second device")
    net = _small_net()
    m = cbir_engine.from_torch(net, torch.zeros(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16, device="cuda")
    assert m(x).device == x.device


def test_backend_is_registered():
    from torch._dynamo import list_backends

    cbir_engine.torch_backend.register()  # a no-op where the entry point already registered it
    assert "cbir_engine" in list_backends()


def _compiled_runs(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Counts engines the backend builds (it loads each through cbir_engine.load)."""
    loads: list[int] = []
    real = cbir_engine.load

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cbir_engine, "load", counting)
    return loads


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet18", 64), ("small_resnet", 28)])
def test_torch_compile_backend_runs_zoo_models(monkeypatch, name, size):
    torch._dynamo.reset()
    loads = _compiled_runs(monkeypatch)
    net, _ = build(name, seed=0)
    chans = 1 if name == "small_resnet" else 3
    compiled = torch.compile(net, backend="cbir_engine")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to eager would warn
        for batch in (2, 3):
            x = torch.randn(batch, chans, size, size)
            with torch.no_grad():
                ref = net(x)
                y = compiled(x)
            assert isinstance(y, torch.Tensor) and y.shape == ref.shape
            assert _rel(y, ref) <= 1e-4
        with torch.inference_mode():
            assert _rel(compiled(x), ref) <= 1e-4
    assert len(loads) >= 1


def test_torch_compile_notices_weight_changes_and_falls_back_for_gradients(monkeypatch):
    torch._dynamo.reset()
    loads = _compiled_runs(monkeypatch)
    net = _small_net()
    compiled = torch.compile(net, backend="cbir_engine")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first = compiled(x)
        assert _rel(first, net(x)) <= 1e-5
        built = len(loads)
        net[0].weight.mul_(2.0)  # an in-place change, as an optimiser step makes
        second = compiled(x)
        assert len(loads) == built + 1  # re-exported
        assert _rel(second, net(x)) <= 1e-5 and _rel(second, first) > 1e-3
    # With gradients wanted, the graph runs in eager torch (with a warning) and stays trainable.
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="cbir_engine")
    with pytest.warns(UserWarning, match="gradients are needed"):
        y = compiled(x)
    assert y.requires_grad
    y.sum().backward()
    assert net[0].weight.grad is not None
