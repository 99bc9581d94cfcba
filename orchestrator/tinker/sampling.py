"""Sampling requests to the samplers (issue 21), a step of the Tinker dispatcher's pass.

A sampling request is a row of `tinker_requests` of kind `sample` (orchestrator.tinker.rows),
written by the API (`/v1/completions`, Tinker's `sample`). Each pass hands the pending ones
to the sampler actor of their base (started on first use: workers.sampling.actor) and writes
back the answers that came in, without waiting for any: a long generation holds up neither
the Tinker requests of pack hosts nor other bases' samples. Ray is imported here only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import update

from core.objectstore import ObjectStoreConfig
from core.usage import sample_tokens
from orchestrator.tinker.rows import FAILED, SAMPLE, SENT, TinkerRequestRow
from orchestrator.tinker.samplers import end_samplers
from orchestrator.tinker.store import TinkerStore

log = logging.getLogger("lorafleet.sampling")

ENDED_CHECK_SECONDS = 2.0  # how often sampling sessions of ended sessions are looked for


class SampleDispatch:
    def __init__(
        self,
        store: TinkerStore,
        base_models: dict[str, str],
        object_store: ObjectStoreConfig,
        model_cache_dir: str,
        namespace: str,
    ) -> None:
        self.store = store
        self.base_models = base_models
        self.object_store = object_store
        self.model_cache_dir = model_cache_dir
        self.namespace = namespace
        self._actors: dict[str, Any] = {}  # base model -> its sampler's handle
        self._inflight: dict[Any, tuple[str, str]] = {}  # ref -> (request id, base model)
        self._started = False
        self._ended_checked = 0.0

    def _fail_orphans(self) -> None:
        """Sample rows marked sent by an earlier scheduler (its Ray refs are gone) fail, so
        their callers hear it at once instead of waiting out their timeout."""
        with self.store.sessions.begin() as session:
            session.execute(
                update(TinkerRequestRow)
                .where(TinkerRequestRow.kind == SAMPLE, TinkerRequestRow.state == SENT)
                .values(
                    state=FAILED,
                    error="the scheduler restarted while it sampled; ask again",
                    finished_at=time.time(),
                )
            )

    def pass_once(self) -> bool:
        """Hands over what is pending and records what finished; whether any is under way."""
        if not self._started:  # what an earlier scheduler handed over is lost with it
            self._started = True
            self._fail_orphans()
        now = time.monotonic()
        if now - self._ended_checked >= ENDED_CHECK_SECONDS:
            self._ended_checked = now
            self._end_samplers()
        pending = self.store.pending_samples()
        for row in pending:
            base = str(row.payload["base_model"])
            self.store.mark_sent([row.id])
            try:
                ref = self._actor(base).sample.remote(row.payload)
            except Exception as exc:  # the actor could not start (a bad base folder, say)
                self.store.finish(row.id, None, f"the sampler of {base} did not start: {exc}")
                continue
            self._inflight[ref] = (row.id, base)
        if self._inflight:
            self._collect()
        return bool(self._inflight)

    def _collect(self) -> None:
        import ray

        done, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        for ref in done:
            request_id, base = self._inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the sampler died: the next request starts another
                log.warning("sampler of %s failed: %s", base, exc)
                self._actors.pop(base, None)
                self.store.finish(request_id, None, f"the sampler of {base} failed: {exc}")
                continue
            self.store.finish(request_id, result, None, {"tokens": sample_tokens(result)})

    def _end_samplers(self) -> None:
        """Sampling sessions whose Tinker session ended: what they queued fails, and their
        bases' samplers drop the weights no live session samples (samplers.end_samplers)."""
        ended = end_samplers(self.store)
        for sampler_id in ended.ids:
            self.store.fail_pending(sampler_id, f"sampling session {sampler_id} ended")
        for base, prefixes in ended.releases.items():
            handle = self._running_actor(base)
            if handle is not None:  # a sampler never started holds nothing
                handle.release.remote(prefixes)

    def _running_actor(self, base: str) -> Any:
        """The base's sampler if one runs (started by this scheduler or an earlier one)."""
        if base in self._actors:
            return self._actors[base]
        import ray

        from workers.sampling.actor import sampler_actor_name

        if not ray.is_initialized():  # no Ray here: no sampler either
            return None
        try:
            return ray.get_actor(sampler_actor_name(base), namespace=self.namespace)
        except ValueError:
            return None

    def _actor(self, base: str) -> Any:
        handle = self._actors.get(base)
        if handle is None:
            import ray

            from workers.sampling.actor import SamplerActor, sampler_actor_name

            handle = (
                ray.remote(SamplerActor)
                .options(
                    name=sampler_actor_name(base),
                    namespace=self.namespace,
                    get_if_exists=True,
                    num_cpus=0,
                    num_gpus=0,
                )
                .remote(
                    self.base_models.get(base, base),
                    self.model_cache_dir,
                    self.object_store,
                )
            )
            self._actors[base] = handle
        return handle
