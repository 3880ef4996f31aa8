"""pack_bits / unpack_bits: the house bit layout from every accepted input form."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_engine.errors import DTypeError, NonFiniteError, ShapeError
from cbir_engine.index import pack_bits, unpack_bits


def layout_reference(bits01: np.ndarray) -> np.ndarray:
    """Builds codes straight from the layout's definition: bit i is bit i % 64 of
    little-endian 64-bit word i // 64 (bit lengths that are a multiple of 64 here)."""
    n, nbits = bits01.shape
    words = np.zeros((n, nbits // 64), dtype=np.uint64)
    for i in range(nbits):
        words[:, i // 64] |= bits01[:, i].astype(np.uint64) << np.uint64(i % 64)
    return words.astype("<u8").view(np.uint8).reshape(n, nbits // 8)


@pytest.mark.parametrize("n", [1, 7, 59, 1023])
@pytest.mark.parametrize("nbits", [64, 128, 256])
def test_layout_and_every_input_form(n, nbits):
    rng = np.random.default_rng(n + nbits)
    bits01 = rng.integers(0, 2, size=(n, nbits), dtype=np.uint8)
    expected = layout_reference(bits01)
    forms = {
        "{0,1} uint8": bits01,
        "{0,1} int64": bits01.astype(np.int64),
        "±1 int8": bits01.astype(np.int8) * 2 - 1,
        "bool": bits01.astype(bool),
        "float sign": (bits01.astype(np.float32) - 0.5) * rng.uniform(0.1, 10, size=bits01.shape),
        "{0.,1.} float64": bits01.astype(np.float64),
    }
    for name, x in forms.items():
        codes = pack_bits(x)
        assert codes.dtype == np.uint8 and codes.shape == (n, nbits // 8), name
        np.testing.assert_array_equal(codes, expected, err_msg=name)
    np.testing.assert_array_equal(unpack_bits(expected), bits01)
    np.testing.assert_array_equal(unpack_bits(expected, signed=True), bits01.astype(np.int8) * 2 - 1)
    np.testing.assert_array_equal(unpack_bits(expected, dtype=np.float32), bits01.astype(np.float32))


@pytest.mark.parametrize("nbits", [8, 24, 96])
def test_round_trip_any_multiple_of_8_and_leading_axes(nbits):
    bits01 = np.random.default_rng(nbits).integers(0, 2, size=(3, 5, nbits), dtype=np.uint8)
    codes = pack_bits(bits01)
    assert codes.shape == (3, 5, nbits // 8)
    np.testing.assert_array_equal(unpack_bits(codes), bits01)
    # Bit i is bit i % 8 of byte i // 8.
    one = np.zeros(nbits, dtype=np.uint8)
    one[nbits - 3] = 1
    packed = pack_bits(one)
    assert packed[(nbits - 3) // 8] == 1 << ((nbits - 3) % 8) and packed.sum() == packed[(nbits - 3) // 8]


def test_zero_is_clear_bit_and_bad_inputs_are_refused():
    assert pack_bits(np.array([0.0, -0.0, 1e-30, -1e-30, 0, 0, 0, 2.0]))[0] == 0b10000100
    with pytest.raises(ShapeError, match="multiple of 8"):
        pack_bits(np.ones(12))
    with pytest.raises(ValueError, match="already packed"):
        pack_bits(np.array([0, 3, 1, 0, 0, 0, 0, 0]))
    with pytest.raises(NonFiniteError):
        pack_bits(np.array([np.nan] + [1.0] * 7))
    with pytest.raises(DTypeError):
        pack_bits(np.array(["a"] * 8))
    with pytest.raises(DTypeError):
        unpack_bits(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ShapeError):
        pack_bits(np.float32(1.0))
