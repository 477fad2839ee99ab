"""Exact tests of the code tables: the float32 bits bitsandbytes uses (sha256 of the bytes)."""

import hashlib

import numpy as np
import pytest

from oftjax import quant

SHA256 = {
    "NF4": "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a",
    "FP4": "b830bcf8857895e5676b8e2ce608a60bb8af9b3ce6270073e9de34814196f09c",
    "DYNAMIC": "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
}


@pytest.mark.parametrize("name", list(SHA256), ids=list(SHA256))
def test_table_bytes(name):
    table = getattr(quant, name)
    assert table.dtype == np.float32 and not table.flags.writeable
    assert hashlib.sha256(table.tobytes()).hexdigest() == SHA256[name]


def test_nf4_is_sorted_with_zero_at_7():
    assert np.all(np.diff(quant.NF4) > 0)
    assert quant.NF4[0] == -1 and quant.NF4[7] == 0 and quant.NF4[15] == 1


def test_fp4_sign_bit_and_magnitudes():
    # bit 3 is the sign: code i+8 is -code i; the magnitudes in bit-pattern order (QLoRA FP4 E2M1, /12)
    np.testing.assert_array_equal(quant.FP4[8:], -quant.FP4[:8])
    expected = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float64) / 12
    np.testing.assert_array_equal(quant.FP4[:8], expected.astype(np.float32))
    assert not np.signbit(quant.FP4[8])  # bnb's torch table has +0.0 at index 8 (CUDA decodes -0.0)


def test_dynamic_map_shape():
    d = quant.DYNAMIC
    assert d.shape == (256,) and np.all(np.diff(d) > 0)
    assert d[127] == 0 and d[255] == 1 and d[0] == np.float32(-0.99296874)


def test_code_table_rejects_unknown_type():
    assert quant.code_table("fp4") is quant.FP4
    with pytest.raises(ValueError, match="unknown quant_type 'int4'"):
        quant.code_table("int4")
