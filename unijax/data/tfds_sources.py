"""TFDS datasets prepared in ArrayRecord format as mixture components (no TensorFlow needed).

An entry built with `configs.base.tfds_source(name, split, data_dir, adapter, ...)` names a
dataset already prepared on disk (`builder.download_and_prepare(file_format="array_record")`,
or `tfds build --file_format=array_record`); nothing is downloaded. The pipeline reads the
split's ArrayRecord files through the same `sources.RecordSource` as unijax shards (bad shards
and unreadable chunks are handled the same way, `tfds.data_source` would raise), and an
adapter turns each serialized TFDS example into a unijax record (`unijax.data.records`):

  caption   image + text   -> kind "caption": [image(input), text(response)]
  t2i       image + text   -> kind "t2i":     [text(prompt), image(target)]
  vqa       image + question + answer -> kind "vqa": [image(input), text(prompt), text(response)]

The feature names are configurable (`image_feature`, `text_feature`, `question_feature`,
`answer_feature`). Images stay encoded when the example holds PNG/JPEG/WebP bytes (TFDS `Image`
features are read without decoding); other encodings and decoded arrays are encoded as PNG.
A text feature holding several strings (e.g. a list of answers) contributes its first one. An
example the adapter cannot map becomes a `Skip`, like a bad unijax record.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from unijax.data import images, records, sources

ADAPTERS = ("caption", "t2i", "vqa")  # unijax.config.DATA_TFDS_ADAPTERS too
_FEATURES = {"caption": ("image_feature", "text_feature"),
             "t2i": ("image_feature", "text_feature"),
             "vqa": ("image_feature", "question_feature", "answer_feature")}

# tensorflow_datasets imports lazily and its feature specs are read once per process: both
# under a lock, since Grain's read threads make the first calls concurrently.
_LOCK = threading.RLock()
_FEATURE_CACHE: dict[str, object] = {}


def _tfds():
    with _LOCK:
        import tensorflow_datasets as tfds

        return tfds


def _features(builder_dir: str):
    """The FeaturesDict of a prepared dataset, loaded once per process."""
    with _LOCK:
        if builder_dir not in _FEATURE_CACHE:
            _FEATURE_CACHE[builder_dir] = _tfds().builder_from_directory(builder_dir).info.features
        return _FEATURE_CACHE[builder_dir]


def resolve(entry, field: str) -> tuple[list[sources.Shard], TfdsAdapter]:
    """The split's ArrayRecord shards and the example adapter of `<field>.tfds`.

    Raises:
      ValueError: naming `<field>.tfds.<key>` when the dataset is not prepared in `data_dir`,
        is not in ArrayRecord format, has no such split, or lacks a configured feature.
    """
    cfg = entry.tfds
    tfds = _tfds()
    data_dir = os.path.expanduser(cfg.get("data_dir") or "") or None
    try:
        builder = tfds.builder(cfg.name, data_dir=data_dir)
        info = builder.info
        split_info = info.splits[cfg.split]
    except Exception as e:  # DatasetNotFoundError, KeyError / ValueError of the split
        raise ValueError(f"{field}.tfds: dataset {cfg.name!r} split {cfg.split!r} is not "
                         f"prepared in data_dir={data_dir or tfds.core.constants.DATA_DIR!r} "
                         f"({type(e).__name__}: {e}); prepare it with "
                         f"file_format='array_record' first") from e
    file_format = getattr(info.file_format, "value", info.file_format)
    if file_format != "array_record":
        raise ValueError(f"{field}.tfds: dataset {cfg.name!r} is stored as {file_format!r}; "
                         f"random access needs it prepared with file_format='array_record'")
    adapter = TfdsAdapter(cfg, os.fspath(builder.data_dir), field)
    names = set(info.features.keys())
    for key in _FEATURES[cfg.adapter]:
        if cfg[key] not in names:
            raise ValueError(f"{field}.tfds.{key}={cfg[key]!r} is not a feature of "
                             f"{cfg.name!r} (features: {sorted(names)})")
    shards = [sources.Shard(os.fspath(fi.filename), int(fi.skip), int(fi.skip + fi.take))
              for fi in split_info.file_instructions]
    return shards, adapter


class TfdsAdapter:
    """Serialized TFDS example bytes, path, index -> a unijax record dict (picklable).

    Raises (from `__call__`):
      records.RecordError: reason "tfds_decode" when the bytes do not parse as an example,
        "missing_field" / "bad_field" when a feature is empty or of the wrong type.
    """

    def __init__(self, cfg, builder_dir: str, field: str):
        self.adapter = str(cfg.adapter)
        if self.adapter not in ADAPTERS:
            raise ValueError(f"{field}.tfds.adapter must be one of {ADAPTERS}, got "
                             f"{self.adapter!r}")
        self.name, self.split, self.builder_dir = str(cfg.name), str(cfg.split), builder_dir
        self.features = {key: str(cfg[key]) for key in _FEATURES[self.adapter]}

    def __call__(self, data: bytes, path: str, index: int) -> dict:
        example = self._deserialize(data)
        image = _image(self._get(example, "image_feature"), self.features["image_feature"])
        if self.adapter == "vqa":
            segs = [image("input"),
                    records.text_segment(self._text(example, "question_feature"), "prompt"),
                    records.text_segment(self._text(example, "answer_feature"), "response")]
        elif self.adapter == "caption":
            segs = [image("input"),
                    records.text_segment(self._text(example, "text_feature"), "response")]
        else:
            segs = [records.text_segment(self._text(example, "text_feature"), "prompt"),
                    image("target")]
        kind = self.adapter
        source = f"tfds:{self.name}/{self.split}"
        return records.make_record(kind, f"{self.name}/{os.path.basename(path)}/{index}",
                                   source, segs, {"tfds": self.name, "file": path,
                                                  "index": int(index)})

    def _deserialize(self, data: bytes) -> dict:
        tfds = _tfds()
        features = _features(self.builder_dir)
        name = self.features["image_feature"]
        # Image features come back encoded (no decode and re-encode); others decode as usual.
        skip = ({name: tfds.decode.SkipDecoding()}
                if isinstance(features[name], tfds.features.Image) else None)
        try:
            return features.deserialize_example_np(data, decoders=skip)
        except Exception as e:  # protobuf / numpy errors on bytes that are not an example
            raise records.RecordError(f"tfds example of {self.name!r} does not parse "
                                      f"({type(e).__name__}: {e})", "tfds_decode") from e

    def _get(self, example: dict, key: str):
        value = example.get(self.features[key])
        if value is None:
            raise records.RecordError(f"tfds feature {self.features[key]!r} is missing",
                                      "missing_field")
        return value

    def _text(self, example: dict, key: str) -> str:
        value = self._get(example, key)
        if isinstance(value, np.ndarray):
            if value.size == 0:
                raise records.RecordError(f"tfds feature {self.features[key]!r} is empty",
                                          "missing_field")
            value = value.reshape(-1)[0]  # several texts (answers, captions): the first
        if isinstance(value, bytes | np.bytes_):
            value = bytes(value).decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise records.RecordError(f"tfds feature {self.features[key]!r}: expected text, "
                                      f"got {type(value).__name__}")
        return str(value)

    def __repr__(self) -> str:
        return f"TfdsAdapter({self.adapter}, {self.name}/{self.split}, {self.features})"


def _image(value, feature: str):
    """An image feature's value -> a function of the role giving the image segment."""
    if (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3
            and value.shape[-1] in (1, 3, 4)):
        pixels = np.broadcast_to(value, (*value.shape[:2], 3)) if value.shape[-1] == 1 else \
            value[..., :3]
        data, mime = images.encode_image(pixels, "image/png"), "image/png"
    elif isinstance(value, bytes | np.bytes_) and len(value):
        data = bytes(value)
        mime = records.sniff_mime(data)
        if mime is None:  # GIF, BMP, ...: decoded here (raises RecordError if broken)
            data, mime = images.encode_image(images.decode_image(data), "image/png"), "image/png"
    else:
        raise records.RecordError(f"tfds feature {feature!r}: expected encoded image bytes or "
                                  f"a uint8 [H, W, 1|3|4] array, got {type(value).__name__} "
                                  f"{getattr(value, 'shape', '')}")
    return lambda role: records.image_segment(data, mime, role)
