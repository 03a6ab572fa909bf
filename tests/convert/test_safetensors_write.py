"""`safetensors_io.write_safetensors` (streamed writes) and `read` (unmapped reads), checked
against the reference safetensors library."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from unijax.convert import safetensors_io


def test_streamed_file_reads_back_with_the_reference_library(tmp_path):
    path = str(tmp_path / "x.safetensors")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
              "b": np.ones((0, 4), np.int32), "c": np.float64(2.5) * np.ones((3,))}
    specs = [(k, v.dtype, v.shape) for k, v in arrays.items()]
    safetensors_io.write_safetensors(path, specs, iter(arrays.values()), {"format": "pt"})
    ref, ours = load_file(path), safetensors_io.open_safetensors(path)
    assert ours.files[0].metadata == {"format": "pt"}
    for key, value in arrays.items():
        assert ref[key].dtype == value.dtype and ref[key].shape == value.shape
        np.testing.assert_array_equal(ref[key], value)
        copy = ours.read(key)
        assert copy.flags.writeable and copy.dtype == value.dtype
        np.testing.assert_array_equal(copy, ours[key])


def test_a_mismatching_array_names_the_tensor_and_leaves_no_file(tmp_path):
    path = tmp_path / "y.safetensors"
    specs = [("w", np.dtype(np.float32), (2, 2)), ("v", np.dtype(np.float32), (3,))]
    with pytest.raises(ValueError, match=r"tensor 'v' is float16 \[3\], its header entry says "
                                         r"float32 \[3\]"):
        safetensors_io.write_safetensors(str(path), specs, [np.zeros((2, 2), np.float32),
                                                            np.zeros(3, np.float16)])
    with pytest.raises(ValueError, match="1 arrays for the 2 tensors"):
        safetensors_io.write_safetensors(str(path), specs, [np.zeros((2, 2), np.float32)])
    assert list(tmp_path.iterdir()) == []
