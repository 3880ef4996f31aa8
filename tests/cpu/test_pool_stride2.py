"""Max and average pools with windows 2 or 3 columns wide at column stride 2 (AlexNet, VGG, ResNet,
GoogLeNet, Inception, DenseNet), on both instruction sets: AVX-512 takes a path of its own that
probes each plane for NaN and pools a plane that has one again with the NaN-keeping kernel."""

from __future__ import annotations

import numpy as np
import pytest

import cbir_engine
from tests.helpers import ort_reference, single_node_model

# (kernel_shape, strides, pads, ceil_mode, dilations, input shape). Widths 1, 7, 16, 59 and 1023;
# outputs of exactly 16 and 32 columns (the last vector reads the buffer's end); row windows of
# 1-3 rows at row strides 1-3; asymmetric pads.
CASES = [
    ([3, 3], [2, 2], [0, 0, 0, 0], 0, None, (1, 3, 7, 7)),
    ([3, 3], [2, 2], [0, 0, 0, 0], 1, None, (2, 5, 8, 8)),
    ([3, 3], [2, 2], [1, 1, 1, 1], 0, None, (1, 4, 59, 59)),
    ([3, 3], [2, 2], [0, 0, 0, 0], 0, None, (1, 2, 9, 65)),  # 32 outputs a row
    ([3, 3], [2, 2], [0, 0, 0, 0], 1, None, (1, 2, 5, 64)),  # 32, the last window half outside
    ([3, 3], [2, 2], [2, 2, 1, 0], 0, None, (1, 3, 10, 33)),
    ([3, 3], [2, 2], [1, 1, 1, 1], 1, None, (1, 2, 5, 1023)),
    ([3, 3], [2, 2], [1, 1, 1, 1], 0, None, (1, 3, 1, 1)),
    ([2, 2], [2, 2], [0, 0, 0, 0], 0, None, (1, 3, 14, 14)),
    ([2, 2], [2, 2], [0, 0, 0, 0], 1, None, (2, 3, 7, 9)),
    ([2, 2], [2, 2], [0, 0, 0, 0], 0, None, (1, 2, 6, 32)),  # 16 outputs a row
    ([2, 2], [2, 2], [1, 1, 1, 1], 0, None, (1, 1, 16, 17)),
    ([1, 2], [1, 2], [0, 0, 0, 0], 0, None, (1, 2, 5, 23)),
    ([3, 2], [3, 2], [1, 1, 1, 1], 1, None, (1, 2, 11, 12)),
    ([2, 3], [1, 2], [0, 1, 0, 1], 0, None, (1, 3, 6, 40)),
    ([3, 3], [2, 2], [1, 1, 1, 1], 0, [2, 1], (1, 2, 13, 13)),  # dilated rows
]


def _model(op: str, kernel, strides, pads, ceil_mode, dilations, shape, **extra):
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": ceil_mode, **extra}
    if dilations is not None:
        attrs["dilations"] = dilations
    return single_node_model(op, {"x": np.zeros(shape, np.float32)}, attrs)


def _run(model, x: np.ndarray) -> np.ndarray:
    return cbir_engine.load(model.SerializeToString(), threads=2).run({"x": x})["y0"]


@pytest.mark.parametrize("kernel,strides,pads,ceil_mode,dilations,shape", CASES)
def test_maxpool_stride2(gemm_isa: str, kernel, strides, pads, ceil_mode, dilations, shape) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    model = _model("MaxPool", kernel, strides, pads, ceil_mode, dilations, shape)
    np.testing.assert_array_equal(_run(model, x), ort_reference(model, {"x": x})[0])


@pytest.mark.parametrize("kernel,strides,pads,ceil_mode,dilations,shape", [c for c in CASES if c[4] is None])
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_avgpool_stride2(
    gemm_isa: str, kernel, strides, pads, ceil_mode, dilations, shape, count_include_pad: int
) -> None:
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    model = _model(
        "AveragePool", kernel, strides, pads, ceil_mode, None, shape, count_include_pad=count_include_pad
    )
    np.testing.assert_allclose(_run(model, x), ort_reference(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


def _maxpool_reference(x: np.ndarray, k: int, pad: int) -> np.ndarray:
    """k x k windows at stride 2 with `pad` on every side; a window holding a NaN gives NaN."""
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::2, ::2]
    nan = np.isnan(windows).any(axis=(-2, -1))
    with np.errstate(invalid="ignore"):
        return np.where(nan, np.nan, np.nanmax(np.where(np.isnan(windows), -np.inf, windows), axis=(-2, -1)))


@pytest.mark.parametrize("k,pad,shape", [(3, 0, (2, 3, 9, 33)), (3, 1, (1, 2, 8, 35)), (2, 0, (1, 3, 6, 34))])
def test_maxpool_stride2_keeps_nan(gemm_isa: str, k: int, pad: int, shape: tuple) -> None:
    """NaN in the first and the last column a window reads, and in a plane's last row, comes
    out as NaN in exactly the windows that hold it; the other planes are pooled as usual."""
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    h, w = shape[2:]
    last_col = min((w + 2 * pad - k) // 2 * 2 + k - 1 - pad, w - 1)  # the last one any window reads
    x[0, 0, 1, last_col] = np.nan
    x[0, 1, 0, 0] = np.nan
    x[-1, -1, h - 1, w // 2] = np.nan
    model = _model("MaxPool", [k, k], [2, 2], [pad] * 4, 0, None, shape)
    got, want = _run(model, x), _maxpool_reference(x, k, pad)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 0]).any() and np.isnan(got[0, 1]).any() and np.isnan(got[-1, -1]).any()
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_maxpool_stride2_infinities(gemm_isa: str) -> None:
    """Infinities of both signs in a plane (whose probe sum turns NaN without a NaN input) pool
    to the exact maxima, NaN nowhere."""
    x = np.random.default_rng(4).standard_normal((1, 2, 9, 21)).astype(np.float32)
    x[0, 0, 2, 3], x[0, 0, 6, 10], x[0, 1, 4, 4] = np.inf, -np.inf, -np.inf
    model = _model("MaxPool", [3, 3], [2, 2], [0, 0, 0, 0], 0, None, x.shape)
    got = _run(model, x)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, _maxpool_reference(x, 3, 0))
    assert np.isinf(got[0, 0]).any()
