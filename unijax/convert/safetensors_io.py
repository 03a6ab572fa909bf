"""safetensors checkpoints read without torch: memory-mapped, one tensor at a time, bf16 too.

  tensors = open_safetensors("/ckpt/Qwen2.5-7B-Instruct")  # a directory or one .safetensors file
  tensors.shape("lm_head.weight")                           # (152064, 3584), from the header
  w = tensors["model.embed_tokens.weight"]                  # read-only view, ml_dtypes.bfloat16
  w = tensors.read("model.embed_tokens.weight")             # an owned copy; nothing stays mapped
  write_safetensors(path, [(name, dtype, shape), ...], arrays)   # streamed, tensor by tensor

The format (huggingface/safetensors): 8 bytes little-endian u64 N, then N bytes of JSON header
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian bytes of every tensor (offsets count from the end of the header).
`safetensors.numpy` cannot return bfloat16 and the trainer's install has no torch, so the
header is parsed here and each tensor is a numpy view of the memory-mapped file: nothing is read
from disk until the values are used, and a slice of a view reads only its pages.

A directory is a Hugging Face or diffusers save: `model.safetensors`, or the shards named by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file), or the same with the
`diffusion_pytorch_model` stem.

A converter that visits every tensor once reads with `read` (one positioned read into a fresh
array): memory-mapped pages that were touched stay resident in the process while the map is
open, so over a whole checkpoint the views would hold it all in memory again.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
STEMS = ("model", "diffusion_pytorch_model")
_HEADER_LIMIT = 100 * 1024 * 1024  # the reference implementation's bound on the JSON header


class SafetensorsFile(Mapping):
    """One `.safetensors` file as a Mapping name -> read-only numpy view (memory-mapped)."""

    def __init__(self, path: str):
        if sys.byteorder != "little":  # ml_dtypes' bfloat16 / float8 views are native-endian
            raise OSError(f"{path}: reading safetensors needs a little-endian host")
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"{self.path}: not a safetensors file (header length {length} "
                                 f"in a file of {size} bytes)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: the safetensors header is not JSON: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._start, data_size = 8 + length, size - 8 - length
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check(name, entry, data_size)
        self._map: np.memmap | None = None

    def _check(self, name: str, entry, data_size: int):
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype_name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed header entry {entry!r}") from e
        if dtype_name not in DTYPES:
            raise ValueError(f"{where}: dtype {dtype_name!r} is not supported (known: "
                             f"{sorted(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] outside the "
                             f"{data_size} data bytes")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{where}: {end - begin} bytes do not hold {dtype_name} "
                             f"{list(shape)}")
        return dtype, shape, begin, end

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        if begin == end:  # nothing to map (np.memmap cannot map zero bytes)
            empty = np.zeros(shape, dtype)
            empty.flags.writeable = False
            return empty
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._start + begin:self._start + end]
        return raw.view(dtype).reshape(shape).view(np.ndarray)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new writable array, read from the file (not mapped)."""
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        out = np.empty(shape, dtype)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            done = 0
            while done < end - begin:
                got = f.readinto(buffer[done:])
                if not got:
                    raise OSError(f"{self.path}: tensor {name!r} ends after {done} of "
                                  f"{end - begin} bytes (truncated file)")
                done += got
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (nothing is read)."""
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]


class SafetensorsCheckpoint(Mapping):
    """Several `.safetensors` files (a sharded save) as one Mapping name -> numpy view."""

    def __init__(self, files: list[SafetensorsFile], where: str):
        self.where = where
        self.files = files
        self._owner: dict[str, SafetensorsFile] = {}
        for file in files:
            for name in file:
                if name in self._owner:
                    raise ValueError(f"{where}: tensor {name!r} is in both "
                                     f"{self._owner[name].path} and {file.path}")
                self._owner[name] = file

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._owner:
            raise KeyError(f"{self.where} has no tensor {name!r}")
        return self._owner[name][name]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new writable array, read from its file (not mapped)."""
        if name not in self._owner:
            raise KeyError(f"{self.where} has no tensor {name!r}")
        return self._owner[name].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, name) -> bool:
        return name in self._owner

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from its file's header (nothing is read)."""
        return self._owner[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._owner[name].dtype(name)


def safetensors_files(path: str) -> list[str]:
    """The `.safetensors` files of a save: `path` itself when it is a file, else the shards its
    `<stem>.safetensors.index.json` names or its single `<stem>.safetensors` (stems: model,
    diffusion_pytorch_model).

    Raises:
      FileNotFoundError: naming the path and what a directory should hold.
    """
    path = str(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no safetensors file or directory at {path}")
    for stem in STEMS:
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' of tensor name -> shard file")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {path}: "
                                        f"{missing}")
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, f"{stem}.safetensors")
        if os.path.isfile(single):
            return [single]
    raise FileNotFoundError(
        f"{path} holds no {' or '.join(s + '.safetensors' for s in STEMS)} (or a sharded "
        f"save's .safetensors.index.json); it holds {sorted(os.listdir(path))[:20]}")


def open_safetensors(path: str) -> SafetensorsCheckpoint:
    """Every tensor of a safetensors save (see `safetensors_files`), read lazily."""
    return SafetensorsCheckpoint([SafetensorsFile(f) for f in safetensors_files(path)],
                                 where=str(path))


def write_safetensors(path: str, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                      arrays: Iterable[np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes one `.safetensors` file without holding its tensors together.

    The header is built from `specs` (name, dtype, shape, in file order); then each array that
    `arrays` yields, in the same order, is checked against its spec and appended, so only the
    array being written is in memory. The file appears (renamed from `path.tmp`) only when
    complete.

    Raises:
      ValueError: naming the tensor whose array has another dtype or shape, an unsupported
        dtype, or a count of arrays that differs from the specs.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"write_safetensors: tensor {name!r} has dtype {dtype}, which "
                             f"safetensors cannot store (known: {sorted(DTYPES)})")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data to 8 bytes
    tmp = f"{path}.tmp"
    count = 0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for (name, dtype, shape), array in zip(specs, arrays):
                array = np.asarray(array)
                if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                    raise ValueError(f"write_safetensors: tensor {name!r} is {array.dtype} "
                                     f"{list(array.shape)}, its header entry says "
                                     f"{np.dtype(dtype)} {list(shape)}")
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                count += 1
        if count != len(specs):
            raise ValueError(f"write_safetensors: {count} arrays for the {len(specs)} "
                             f"tensors of {path}")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
