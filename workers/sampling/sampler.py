"""A sampler of one base (issue 21): an unpartitioned fp32 copy of the base (transformers +
peft on CPU or one device; vLLM with multi-LoRA is not used yet), its tokenizer, and the
adapters asked for, loaded from the object store on demand and kept while hot (LRU, at most
`max_adapters`; the least recently used one is dropped first).

`sample(request)` takes the dict the scheduler's dispatcher sends (a row's payload) and
answers a plain dict (it crosses Ray and lands in a JSON column). A request the model
cannot serve (too long, no such adapter) answers {"error", "param"} instead of raising.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from core.object_keys import ADAPTER_FILES
from core.objectstore import ObjectStoreConfig, open_object_store
from workers.sampling.generate import SampledSequence, SamplingParams, generate

DEFAULT_MAX_ADAPTERS = 8


class SampleError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template when it has one (with the assistant's turn opened);
    else "role: content" lines and a last "assistant:"."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


class Sampler:
    def __init__(
        self,
        base_dir: str | Path,
        object_store: ObjectStoreConfig | None = None,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.base.eval()
        self.model: Any = self.base  # a PeftModel around it once an adapter is loaded
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.objects = open_object_store(object_store) if object_store is not None else None
        self.max_adapters = max_adapters
        self.adapters: OrderedDict[str, None] = OrderedDict()  # name -> (), oldest first
        self._work = tempfile.TemporaryDirectory(prefix="lorafleet-sampler-")

    # ---- adapters ---------------------------------------------------------------------------
    def use_adapter(self, prefix: str | None) -> None:
        """Makes the adapter under `prefix` (in the store; a local folder without a store)
        the active one, loading it if it is not cached; None: the base alone."""
        if prefix is None:
            return
        name = adapter_name(prefix)
        if name in self.adapters:
            self.adapters.move_to_end(name)
        else:
            self._load(name, self._fetch(name, prefix))
        self.model.set_adapter(name)

    def _fetch(self, name: str, prefix: str) -> Path:
        if self.objects is None:
            return Path(prefix)
        folder = Path(self._work.name) / name
        for file in ADAPTER_FILES:
            if not self.objects.exists(prefix + file):
                raise SampleError(f"model: no adapter is stored for it ({file})", "model")
            self.objects.download(prefix + file, folder / file)
        return folder

    def _load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
            self.model.eval()
        else:
            self.model.load_adapter(folder, adapter_name=name)
        self.adapters[name] = None
        while len(self.adapters) > self.max_adapters:
            oldest, _ = self.adapters.popitem(last=False)
            self.model.set_adapter(name)  # never delete the active one
            self.model.delete_adapter(oldest)

    def release(self, prefixes: list[str]) -> int:
        """Drops the cached adapters under `prefixes` (their sampling sessions ended: their
        weights are not held any longer); how many were cached. A later request for one
        loads it again; without any left, the bare base serves."""
        released = 0
        for name in {adapter_name(p) for p in prefixes} & set(self.adapters):
            del self.adapters[name]
            released += 1
            if not self.adapters:  # the last one: the base without LoRA layers again
                self.model.unload()  # peft puts the base's own layers back, in place
                self.model = self.base
                continue
            if self.model.active_adapter == name:  # peft keeps one adapter active
                self.model.set_adapter(next(reversed(self.adapters)))
            self.model.delete_adapter(name)
        return released

    # ---- sampling ---------------------------------------------------------------------------
    def run(
        self,
        prefix: str | None,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        stop: list[str] | None = None,
    ) -> list[SampledSequence]:
        self.use_adapter(prefix)
        limit = getattr(self.base.config, "max_position_embeddings", None)
        if limit is not None and len(prompt) + params.max_tokens > limit:
            raise SampleError(
                f"max_tokens: prompt ({len(prompt)} tokens) + max_tokens "
                f"({params.max_tokens}) exceeds the model's context of {limit}",
                "max_tokens",
            )

        def stops_at(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return any(s in text for s in stop or ())

        if prefix is None and self.model is not self.base:
            with self.model.disable_adapter():
                return generate(self.model, prompt, params, n, stops_at if stop else None)
        return generate(self.model, prompt, params, n, stops_at if stop else None)

    def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._sample(request)
        except SampleError as exc:
            return {"error": str(exc), "param": exc.param}

    def _sample(self, request: dict[str, Any]) -> dict[str, Any]:
        chat = request.get("messages") is not None
        if request.get("prompt_tokens") is not None:
            prompt = [int(t) for t in request["prompt_tokens"]]
        else:
            text = chat_prompt(self.tokenizer, request["messages"]) if chat else request["prompt"]
            prompt = self.tokenizer(text)["input_ids"]
        if not prompt:
            raise SampleError("prompt: it has no tokens", "prompt")
        vocab = self.base.get_input_embeddings().num_embeddings
        if not all(0 <= t < vocab for t in prompt):
            raise SampleError(f"prompt: token ids are in [0, {vocab})", "prompt")
        stop_tokens = set(request.get("stop_tokens") or ())
        if request.get("stop_at_eos", True) and self.tokenizer.eos_token_id is not None:
            stop_tokens.add(self.tokenizer.eos_token_id)
        params = SamplingParams(
            max_tokens=int(request["max_tokens"]),
            temperature=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=int(request.get("top_k") or 0),
            seed=request.get("seed"),
            stop_tokens=frozenset(stop_tokens),
        )
        stop = list(request.get("stop") or [])
        sequences = self.run(request.get("adapter_prefix"), prompt, params, request["n"], stop)
        return {
            "prompt_tokens": len(prompt),
            "choices": [self._choice(s, stop) for s in sequences],
        }

    def _choice(self, sequence: SampledSequence, stop: list[str]) -> dict[str, Any]:
        text = str(self.tokenizer.decode(sequence.tokens, skip_special_tokens=True))
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return {
            "text": text[:cut] if cut >= 0 else text,
            "tokens": sequence.tokens,
            "token_strings": [self.tokenizer.decode([t]) for t in sequence.tokens],
            "logprobs": sequence.logprobs,
            "finish_reason": sequence.finish_reason,
        }


def adapter_name(prefix: str) -> str:
    """The cache's name of the adapter under `prefix` (a valid module name for peft)."""
    return "a" + hashlib.sha256(prefix.encode()).hexdigest()[:16]
