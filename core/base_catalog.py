"""The base-model catalog, checked without loading a model (no torch, no transformers).

An entry names a Hugging Face folder (local, or `s3://bucket/prefix` on the store's
endpoint). It is usable when its `config.json` exists; its linear layers, the only valid
LoRA targets, are read from the safetensors headers: every 2-D `*.weight` tensor except
embeddings and the output layer (`lm_head`), as the workers match them. The same headers
and config.json give the memory estimate its base (`base_shape`, core.memory_estimate).
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from core.memory_estimate import CONV1D_MODEL_TYPES, BaseShape
from core.objectstore import ObjectStoreConfig
from core.s3_objectstore import S3ObjectStore

ALL_LINEAR = "all-linear"
CONFIG = "config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound on its header
MAX_LISTED = 20
# Layers that are not LoRA targets though their weights are 2-D: the output layer and
# embedding tables (token and position).
_NOT_LINEAR_LEAVES = ("lm_head", "wte", "wpe")


class CatalogError(ValueError):
    """A catalog entry or a request against it is unusable; says which, and why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


ReadRange = Callable[[int, int], bytes]  # (offset, length) -> bytes


def parse_safetensors_header(read: ReadRange, where: str) -> dict[str, dict[str, object]]:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    prefix = read(0, 8)
    if len(prefix) != 8:
        raise CatalogError(f"{where}: too short to be a safetensors file")
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_BYTES:
        raise CatalogError(f"{where}: safetensors header of {size} bytes is too large")
    try:
        header = json.loads(read(8, size))
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"{where}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CatalogError(f"{where}: safetensors header is not an object")
    header.pop("__metadata__", None)
    return header


def linear_modules(headers: Iterable[dict[str, dict[str, object]]]) -> set[str]:
    """Module paths of the linear layers: 2-D `*.weight` tensors, minus embeddings and
    the output layer."""
    modules = set()
    for header in headers:
        for name, info in header.items():
            if not name.endswith(".weight"):
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or len(shape) != 2:
                continue
            path = name.removesuffix(".weight")
            leaf = path.rpartition(".")[2]
            if leaf in _NOT_LINEAR_LEAVES or "embed" in leaf:
                continue
            modules.add(path)
    return modules


def unmatched_targets(targets: list[str], modules: set[str]) -> list[str]:
    """The targets that match no linear layer; a target matches a module path or its last
    components (as peft and the workers match them)."""
    return [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]


class BaseModelCatalog:
    """Name -> location of each base model, with the checks a job submission needs.

    Linear-layer names are read once per location and kept: a base model's weights do not
    change under a running server. Whether its folder still exists is checked every time.
    """

    def __init__(self, entries: dict[str, str], store: ObjectStoreConfig) -> None:
        self.entries = dict(entries)
        self.store = store
        self._modules: dict[str, set[str]] = {}
        self._shapes: dict[str, BaseShape] = {}
        self._model_types: dict[str, str] = {}
        self._lock = threading.Lock()

    def check_all(self) -> None:
        """Raises on the first entry whose folder has no config.json (for server start)."""
        for name in sorted(self.entries):
            self.check_exists(name)

    def check_exists(self, name: str) -> None:
        location = self.entries[name]
        if not self._has(location, CONFIG):
            raise CatalogError(
                f"base model {name!r}: {location} has no {CONFIG} (is the folder there? "
                "an entry must be a Hugging Face model folder, local or s3://)",
                param="model",
            )

    def check_target_modules(self, name: str, targets: str | list[str]) -> None:
        """Raises when a target names no linear layer of the base; lists the valid ones."""
        self._check_adaptable(name)
        if targets == ALL_LINEAR:
            return
        modules = self.linear_modules(name)
        bad = unmatched_targets(list(targets), modules)
        if bad:
            leaves = sorted({m.rpartition(".")[2] for m in modules})
            valid = ", ".join(leaves[:MAX_LISTED]) + (" …" if len(leaves) > MAX_LISTED else "")
            raise CatalogError(
                f"lora.target_modules {bad} match no linear layer of {name!r}; "
                f"valid: {ALL_LINEAR!r} or any of {valid}",
                param="lora.target_modules",
            )

    def _check_adaptable(self, name: str) -> None:
        """Raises for a base whose projections are Hugging Face Conv1D layers (GPT-2 and its
        kin): their 2-D weights look linear in the headers, but the packed LoRA layer wraps
        nn.Linear only, so such a job would be accepted and then adapt nothing."""
        location = self.entries[name]
        with self._lock:
            model_type = self._model_types.get(location)
        if model_type is None:
            try:
                model_type = str(json.loads(self._read(location, CONFIG)).get("model_type", ""))
            except (OSError, ValueError) as exc:
                raise CatalogError(
                    f"base model {name!r}: {location}/{CONFIG} cannot be read ({exc})",
                    param="model",
                ) from exc
            with self._lock:
                self._model_types[location] = model_type
        if model_type in CONV1D_MODEL_TYPES:
            raise CatalogError(
                f"base model {name!r} is a {model_type} model: its layers are Conv1D, which "
                "lorafleet cannot adapt yet; use a base with nn.Linear projections (Llama, "
                "Qwen2, Mistral, …)",
                param="model",
            )

    def linear_modules(self, name: str) -> set[str]:
        location = self.entries[name]
        with self._lock:
            cached = self._modules.get(location)
        if cached is not None:
            return cached
        modules = linear_modules(self._headers(name, location))
        with self._lock:
            self._modules[location] = modules
        return modules

    def base_shape(self, name: str) -> BaseShape:
        """The base's sizes for the memory estimate, from its config.json and the shapes in
        its safetensors headers (local or s3://); read once per location."""
        location = self.entries[name]
        with self._lock:
            cached = self._shapes.get(location)
        if cached is not None:
            return cached
        try:
            config = json.loads(self._read(location, CONFIG))
            shape = BaseShape.from_tensors(config, tensor_shapes(self._headers(name, location)))
        except (OSError, KeyError, ValueError) as exc:
            raise CatalogError(
                f"base model {name!r}: its sizes cannot be read from {location} ({exc})",
                param="model",
            ) from exc
        with self._lock:
            self._shapes[location] = shape
        return shape

    # ---- reading a folder, local or on S3 ----
    def _read(self, location: str, file: str) -> bytes:
        if location.startswith("s3://"):
            return self._s3(location).get_bytes(file)
        return (Path(location) / file).read_bytes()

    def _s3(self, location: str) -> S3ObjectStore:
        return S3ObjectStore(replace(self.store, url=location), retries=2)

    def _has(self, location: str, file: str) -> bool:
        if location.startswith("s3://"):
            return self._s3(location).exists(file)
        return (Path(location) / file).is_file()

    def _headers(self, name: str, location: str) -> list[dict[str, dict[str, object]]]:
        if location.startswith("s3://"):
            store = self._s3(location)
            files = sorted(k for k in store.list("") if k.endswith(".safetensors"))

            def reader(key: str) -> ReadRange:
                def read(offset: int, length: int) -> bytes:
                    reply = store.client.get_object(
                        Bucket=store.bucket,
                        Key=store._key(key),
                        Range=f"bytes={offset}-{offset + length - 1}",
                    )
                    data: bytes = reply["Body"].read()
                    return data

                return read

            readers = [(f"{location}/{key}", reader(key)) for key in files]
        else:
            paths = sorted(Path(location).glob("*.safetensors"))
            readers = [(str(path), _file_reader(path)) for path in paths]
        if not readers:
            raise CatalogError(
                f"base model {name!r}: no .safetensors weights in {location}", param="model"
            )
        return [parse_safetensors_header(read, where) for where, read in readers]


def tensor_shapes(headers: Iterable[dict[str, dict[str, object]]]) -> dict[str, list[int]]:
    """Tensor name -> shape, over every safetensors file of a base."""
    shapes = {}
    for header in headers:
        for name, info in header.items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
                shapes[name] = shape
    return shapes


def local_base_shape(folder: Path) -> BaseShape:
    """The memory estimate's base from a local model folder (a host's downloaded base)."""
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise CatalogError(f"no .safetensors weights in {folder}")
    headers = [parse_safetensors_header(_file_reader(path), str(path)) for path in paths]
    config = json.loads((folder / CONFIG).read_text())
    return BaseShape.from_tensors(config, tensor_shapes(headers))


def _file_reader(path: Path) -> ReadRange:
    def read(offset: int, length: int) -> bytes:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read(length)

    return read
