"""The SDK's protobuf bodies: `forward_backward` requests in, `ForwardBackwardOutput` out,
with the SDK's own message definitions (`tinker/proto/tinker_public_pb2.py`).

That module is loaded from its file alone: importing it as `tinker.proto…` would run the
SDK package's `__init__`, which imports torch when it is installed, and an API replica
imports no training stack.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

PROTO_CONTENT_TYPE = "application/x-protobuf"
# Each loss and the per-token inputs it needs (Tinker's names; one value per input token).
LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
}
# The `loss_fn_config` keys each loss reads (numbers); any other key is refused.
LOSS_CONFIG = {"ppo": ("clip_low_threshold", "clip_high_threshold")}
LOSS_CONFIG["cispo"] = LOSS_CONFIG["ppo"]


class WireError(ValueError):
    """A body the API cannot read: answered 400 naming the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@cache
def messages() -> ModuleType:
    loaded = sys.modules.get("tinker.proto.tinker_public_pb2")
    if loaded is not None:  # the SDK itself is in this process (tests): one descriptor pool
        return loaded
    spec = importlib.util.find_spec("tinker")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Tinker API needs the `tinker` package (pip install tinker)")
    path = Path(spec.origin).parent / "proto" / "tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location("tinker.proto.tinker_public_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules["tinker.proto.tinker_public_pb2"] = module  # the SDK finds the same one
    return module


def _dense(tensor: Any, name: str) -> np.ndarray:
    pb = messages()
    if tensor.HasField("sparse_csr"):
        raise WireError(f"{name}: sparse tensors are not supported yet; send it dense", name)
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64}
    dtype = dtypes.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{name}: dtype must be float32 or int64", name)
    return np.frombuffer(tensor.dense, dtype=dtype)


def decode_forward_backward(body: bytes) -> dict[str, Any]:
    """The request as plain data: model_id, seq_id, loss_fn, forward_only and per datum its
    tokens, target_tokens and weights (one per token). Raises WireError naming the field."""
    pb = messages()
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError, not importable without the SDK
        raise WireError(f"body: not a ForwardBackwardRequest protobuf ({exc})", "body") from exc
    if not msg.data:
        raise WireError("forward_backward_input.data: at least one datum is required", "data")
    needed = LOSS_INPUTS.get(msg.loss_fn)
    if needed is None:
        raise WireError(
            f"loss_fn: {msg.loss_fn!r} is not supported yet (one of {', '.join(LOSS_INPUTS)})",
            "loss_fn",
        )
    config = _loss_config(msg)
    data = []
    for i, datum in enumerate(msg.data):
        where = f"forward_backward_input.data[{i}]"
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError(f"{where}.model_input: only text chunks are supported", where)
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        if not tokens:
            raise WireError(f"{where}.model_input: no tokens", where)
        inputs = datum.loss_fn_inputs
        plain: dict[str, Any] = {"tokens": tokens}
        for name in needed:
            if name not in inputs:
                raise WireError(f"{where}.loss_fn_inputs.{name} is required by {msg.loss_fn}", name)
            values = _dense(inputs[name], f"{where}.loss_fn_inputs.{name}")
            if len(values) != len(tokens):
                raise WireError(
                    f"{where}.loss_fn_inputs.{name}: {len(values)} values for "
                    f"{len(tokens)} input tokens (one per token)",
                    name,
                )
            kind = np.int64 if name == "target_tokens" else np.float64
            plain[name] = values.astype(kind).tolist()
        data.append(plain)
    return {
        "model_id": msg.model_id,
        "seq_id": msg.seq_id,
        "loss_fn": msg.loss_fn,
        "loss_fn_config": config,
        "forward_only": msg.forward_only,
        "data": data,
    }


def _loss_config(msg: Any) -> dict[str, float]:
    """The request's `loss_fn_config` as numbers: the SDK writes both maps, and v2 (which
    can also hold text) wins where it is set."""
    config: dict[str, float] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") != "number":
            raise WireError(f"loss_fn_config.{key}: must be a number", f"loss_fn_config.{key}")
        config[key] = value.number
    allowed = LOSS_CONFIG.get(msg.loss_fn, ())
    for key in config:
        if key not in allowed:
            takes = ", ".join(allowed) or "no keys"
            raise WireError(
                f"loss_fn_config.{key}: not read by {msg.loss_fn} (it takes {takes})",
                f"loss_fn_config.{key}",
            )
    low, high = (config.get(key) for key in ("clip_low_threshold", "clip_high_threshold"))
    if low is not None and high is not None and low > high:
        raise WireError(
            "loss_fn_config.clip_low_threshold: above clip_high_threshold",
            "loss_fn_config.clip_low_threshold",
        )
    return config


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """`{"outputs": [{field: [floats]}], "metrics": {...}}` as the SDK's proto: one
    ArrayRecord, each field a float32 BatchedTensor sliced per datum by byte offsets."""
    pb = messages()
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = "ArrayRecord"
    outputs = result["outputs"]
    record = msg.loss_fn_outputs.add()
    record.num_datums = len(outputs)
    for name in outputs[0] if outputs else []:
        arrays = [np.asarray(o[name], dtype=np.float32) for o in outputs]
        offsets = np.cumsum([0, *(a.nbytes for a in arrays)]).astype(np.int64)
        field = record.fields[name]
        field.dtype = pb.DTYPE_FLOAT32
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.tobytes()
    for key, value in result["metrics"].items():
        msg.metrics[key] = float(value)
    return bytes(msg.SerializeToString())
