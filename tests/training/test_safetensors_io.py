"""The torch-free safetensors reader against the `safetensors` library itself."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from unijax.convert import safetensors_io

# safetensors' dtype names of the numpy dtypes written below.
NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
         "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def _tensors(rng) -> dict[str, np.ndarray]:
    f32 = rng.normal(size=(5, 7)).astype(np.float32)
    return {
        "f32": f32,
        "bf16": (f32 * 3).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(2, 3, 4)).astype(np.float16),
        "i64": rng.integers(-2**40, 2**40, size=(9,)),
        "i32": rng.integers(-100, 100, size=(3, 1), dtype=np.int32),
        "u8": rng.integers(0, 255, size=(4, 4), dtype=np.uint8),
        "mask": rng.random((6,)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_reader_matches_the_library_on_every_dtype(tmp_path, rng):
    tensors = _tensors(rng)
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "np"})
    with open(path, "rb") as f:
        library = dict(safetensors.deserialize(f.read()))  # raw bytes, any dtype
    numpy_values = load_file(path)  # the library's numpy reader (no bfloat16 there)
    ours = safetensors_io.SafetensorsFile(path)
    assert set(ours) == set(tensors) and ours.metadata == {"format": "np"}
    for name, value in tensors.items():
        got = ours[name]
        assert got.dtype == value.dtype, name
        assert ours.shape(name) == tuple(library[name]["shape"]) == value.shape
        assert NAMES[got.dtype.name] == library[name]["dtype"]
        assert got.tobytes() == bytes(library[name]["data"]), name
        if value.dtype != ml_dtypes.bfloat16:
            np.testing.assert_array_equal(got, numpy_values[name])
        np.testing.assert_array_equal(got, value)
        assert not got.flags.writeable  # a view of the read-only map, not a copy


def test_sharded_directory_reads_through_its_index(tmp_path, rng):
    tensors = _tensors(rng)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4],
              "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    ours = safetensors_io.open_safetensors(str(tmp_path))
    assert len(ours.files) == 2 and set(ours) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name], value)
        assert ours.shape(name) == value.shape and ours.dtype(name) == value.dtype


def test_broken_files_name_the_file_and_the_tensor(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": np.ones((4, 4), np.float32)}, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-8])  # the last two floats are gone
    with pytest.raises(ValueError, match=r"t\.safetensors: tensor 'w': data_offsets"):
        safetensors_io.SafetensorsFile(path)
    with open(path, "wb") as f:
        f.write(b"\x05")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_io.SafetensorsFile(path)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=r"holds no model\.safetensors"):
        safetensors_io.open_safetensors(str(tmp_path))
