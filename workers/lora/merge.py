"""A LoRA adapter merged into its base at a chosen scale, one base shard at a time.

        W' = W + scale · (alpha / r) · B · A        (in the base's dtype; sums in fp32)

    base shard ──header──▶ merged shard: the same header (names, dtypes, shapes, offsets)
               ──tensor──▶ a targeted weight is read alone, changed in place one block of
                           rows at a time, and written; every other tensor is copied as bytes

A shard is never held whole: the most this holds at once is the largest targeted weight, one
fp32 block of rows and the adapter's factors (counted by `LiveTensorBytes`, `MergeStats`),
so a 70B base merges in the memory of its largest matrix. The merged folder keeps the base's
shard names and index and copies its config and tokenizer, so
`AutoModelForCausalLM.from_pretrained` loads it as it loads the base.

`merge_adapter(base_dir, adapter_dir, out_dir, scale)` is the plain function (the demo and
tests call it); `workers.runtime.merge_task` runs it as a Ray task writing to the store.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from workers.runtime.live_tensor_bytes import LiveTensorBytes

ADAPTER_PREFIX = "base_model.model."
WEIGHT_SUFFIXES = (".safetensors",)
COPY_CHUNK = 1024 * 1024  # untouched tensors and other files are copied this much at a time
BLOCK_BYTES = 8 * 1024 * 1024  # a targeted weight is merged this many fp32 bytes of rows at a time
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

FileDone = Callable[[str, Path], None]


class MergeError(ValueError):
    """The adapter does not fit the base, or uses a LoRA variant a plain merge cannot do."""


@dataclass(frozen=True)
class LoraDelta:
    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    scaling: float  # alpha / r (or alpha / √r with rsLoRA)
    fan_in_fan_out: bool  # the base stores this weight as in × out (GPT-2's Conv1D)


@dataclass(frozen=True)
class MergeStats:
    files: list[str]  # every file written, shards first, in the order they were finished
    shards: int
    merged_weights: int
    largest_shard_bytes: int  # of the base
    largest_weight_bytes: int  # the largest weight that was merged
    peak_tensor_bytes: int  # tensor bytes alive at the worst moment (adapter included)


def lora_deltas(adapter_dir: Path) -> dict[str, LoraDelta]:
    """The adapter's factors keyed by the base weight each one changes
    ("model.layers.0.self_attn.q_proj.weight"), from a PEFT folder."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    refused = [
        name
        for name in ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication")
        if config.get(name)
    ]
    if refused:
        raise MergeError(f"adapter uses {', '.join(refused)}: a plain LoRA merge cannot")
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    alpha = float(config["lora_alpha"])
    deltas = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise MergeError(f"adapter holds {key}, which is not a LoRA factor")
            continue
        module = key.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight")
        b = state[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = LoraDelta(
            a.float(), b.float(), scaling, bool(config.get("fan_in_fan_out"))
        )
    return deltas


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    scale: float = 1.0,
    on_file: FileDone | None = None,
) -> MergeStats:
    """Writes `base_dir` with the adapter in `adapter_dir` merged at `scale` into `out_dir`.

    `on_file(name, path)` is called as each output file is complete (the store upload takes
    it there and may delete it, so the disk holds one shard at a time too)."""
    if not math.isfinite(scale):
        raise MergeError(f"scale must be finite, not {scale}")
    shards = sorted(p for p in base_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not shards:
        raise MergeError(f"{base_dir} holds no .safetensors weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = on_file or (lambda _name, _path: None)
    tracker = LiveTensorBytes()
    deltas = lora_deltas(adapter_dir)
    tracker.hold(t for d in deltas.values() for t in (d.a, d.b))
    left = set(deltas)
    written: list[str] = []
    largest_weight = 0
    with tracker:
        for shard in shards:
            merged = _merge_shard(shard, out_dir / shard.name, deltas, scale, tracker)
            left -= set(merged)
            largest_weight = max([largest_weight, *merged.values()])
            written.append(shard.name)
            done(shard.name, out_dir / shard.name)
    if left:
        raise MergeError(
            f"the base has no weight for {sorted(left)[:5]} (adapter of another base?)"
        )
    for path in sorted(base_dir.iterdir()):
        # Config, generation config, tokenizer, the shards' index (its names are kept).
        if path.is_file() and not path.name.startswith(".") and path not in shards:
            if path.suffix in (".bin", ".pt", ".pth"):
                continue  # pickled weights beside the safetensors ones: never loaded
            shutil.copyfile(path, out_dir / path.name)
            written.append(path.name)
            done(path.name, out_dir / path.name)
    return MergeStats(
        files=written,
        shards=len(shards),
        merged_weights=len(deltas),
        largest_shard_bytes=max(p.stat().st_size for p in shards),
        largest_weight_bytes=largest_weight,
        peak_tensor_bytes=tracker.peak,
    )


def _merge_shard(
    source: Path,
    target: Path,
    deltas: dict[str, LoraDelta],
    scale: float,
    tracker: LiveTensorBytes,
) -> dict[str, int]:
    """One shard: its header as it is (same dtypes, shapes and offsets), then each tensor in
    offset order. Returns the merged weights' names and sizes."""
    merged: dict[str, int] = {}
    with source.open("rb") as reader, target.open("wb") as writer:
        (header_size,) = struct.unpack("<Q", reader.read(8))
        header_bytes = reader.read(header_size)
        writer.write(struct.pack("<Q", header_size) + header_bytes)
        header: dict[str, Any] = json.loads(header_bytes)
        header.pop("__metadata__", None)
        position = 0
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            begin, end = info["data_offsets"]
            if begin != position:
                raise MergeError(f"{source.name}: tensors are not laid out back to back")
            delta = deltas.get(name)
            if delta is None:
                _copy(reader, writer, end - begin)
            else:
                weight = _read_tensor(reader, info, end - begin, source.name, name)
                tracker.track(weight)
                _add_delta(weight, delta, scale)
                writer.write(weight.reshape(-1).view(torch.uint8).numpy().data)
                merged[name] = end - begin
                del weight
            position = end
    return merged


def _read_tensor(
    reader: io.BufferedReader, info: dict[str, Any], size: int, shard: str, name: str
) -> torch.Tensor:
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise MergeError(f"{shard}: {name} is {info['dtype']}, not a floating-point weight")
    buffer = bytearray(size)
    if reader.readinto(buffer) != size:
        raise MergeError(f"{shard} ends inside {name}")
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def _add_delta(weight: torch.Tensor, delta: LoraDelta, scale: float) -> None:
    """weight += scale·scaling·B·A, in place, a block of rows at a time, summed in fp32."""
    if weight.dim() != 2:
        raise MergeError(f"LoRA targets a weight of shape {tuple(weight.shape)}, not a matrix")
    expected = (delta.b.shape[0], delta.a.shape[1])
    if delta.fan_in_fan_out:
        expected = expected[::-1]
    if tuple(weight.shape) != expected:
        raise MergeError(f"weight of shape {tuple(weight.shape)}, adapter for {expected}")
    factor = scale * delta.scaling
    rows_per_block = max(1, BLOCK_BYTES // (4 * weight.shape[1]))
    with torch.no_grad():
        for start in range(0, weight.shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            if delta.fan_in_fan_out:  # W is in × out: its rows are columns of B·A
                change = delta.a[:, rows].T @ delta.b.T
            else:
                change = delta.b[rows] @ delta.a
            block = weight[rows].float()
            block.add_(change, alpha=factor)
            weight[rows] = block.to(weight.dtype)
            del change, block


def _copy(reader: BinaryIO, writer: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = reader.read(min(COPY_CHUNK, size))
        if not chunk:
            raise MergeError("a shard ends before its header says")
        writer.write(chunk)
        size -= len(chunk)
