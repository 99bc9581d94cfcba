"""Saved weights of Tinker models (issue 21): `save_weights` (factors and optimizer state),
`save_weights_for_sampler` and `save_weights_external` (a PEFT adapter), `load_weights`
(into a model, or a new one: `create_training_client_from_state`), and the download URLs
`tinker checkpoint download` fetches. `tinker://{model_id}/{kind}/{name}` paths map to the
object store under the owner's tenant (core.object_keys.tinker_checkpoint_prefix): a path
of another tenant's model is a 404, as any other tenant's object."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from api.deps import ServicesDep
from core.object_keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, tinker_checkpoint_prefix
from core.objectstore import LocalObjectStore, ObjectStore
from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.tinker.rows import TinkerModelRow
from orchestrator.tinker.samplers import create_sampler
from orchestrator.tinker.store import SessionEnded, TinkerStore

from .common import Body, StoreDep, TenantDep, write_request

router = APIRouter()

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
KINDS = ("weights", "sampler_weights", "external_weights")
ABOUT = "lorafleet.json"  # written last by the host: the checkpoint is whole
URL_SECONDS = 3600


class SaveWeights(Body):
    model_id: str
    path: str | None = None
    seq_id: int = Field(ge=1)
    sampling_session_seq_id: int | None = Field(default=None, ge=0)


class LoadWeights(Body):
    model_id: str | None = None
    seq_id: int | None = Field(default=None, ge=1)
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    path: str
    optimizer: bool = False


def _name(path: str | None) -> str:
    if path is None or not NAME.match(path):
        raise InvalidRequest(
            f"path: {path!r} must be a name of letters, digits, '_', '.' and '-'",
            "path",
        )
    return path


def parse_tinker_path(path: str) -> tuple[str, str]:
    """`tinker://{model_id}/{kind}/{name}` → (model_id, "{kind}/{name}")."""
    parts = path.removeprefix("tinker://").split("/")
    if not path.startswith("tinker://") or len(parts) != 3 or parts[1] not in KINDS:
        raise InvalidRequest(
            f"path: {path!r} is not a tinker://<model_id>/<{'|'.join(KINDS)}>/<name> path",
            "path",
        )
    return parts[0], f"{parts[1]}/{_name(parts[2])}"


async def _save(
    body: SaveWeights,
    kind: str,
    tenant: str,
    store: TinkerStore,
    optimizer: bool,
    sampling_session_id: str | None = None,
) -> dict[str, Any]:
    checkpoint_id = f"{kind}/{_name(body.path)}"
    model = await run_in_threadpool(store.model, tenant, body.model_id)
    payload = {
        "prefix": tinker_checkpoint_prefix(tenant, model.id, checkpoint_id),
        "path": f"tinker://{model.id}/{checkpoint_id}",
        "optimizer": optimizer,
        "base_model": model.base_model,
        "lora": model.lora,
    }
    if sampling_session_id is not None:  # retrieve_future answers it with the path
        payload["sampling_session_id"] = sampling_session_id
    return await write_request(store, tenant, model.id, body.seq_id, "save_weights", payload)


@router.post("/save_weights")
async def save_weights(body: SaveWeights, tenant: TenantDep, store: StoreDep) -> dict[str, Any]:
    return await _save(body, "weights", tenant, store, optimizer=True)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    body: SaveWeights, tenant: TenantDep, store: StoreDep
) -> dict[str, Any]:
    if body.path is not None:
        return await _save(body, "sampler_weights", tenant, store, optimizer=False)
    # No path (`save_weights_and_get_sampling_client`): the weights get a name of their
    # own and a sampling session on them, whose id the future answers.
    model = await run_in_threadpool(store.model, tenant, body.model_id)
    seq = body.sampling_session_seq_id if body.sampling_session_seq_id is not None else body.seq_id
    name = f"sampler-{seq}"
    checkpoint_id = f"sampler_weights/{name}"
    try:
        sampler = await run_in_threadpool(
            create_sampler,
            store,
            tenant,
            model.session_id,
            seq,
            model.base_model,
            f"tinker://{model.id}/{checkpoint_id}",
            tinker_checkpoint_prefix(tenant, model.id, checkpoint_id),
        )
    except SessionEnded as exc:
        raise InvalidRequest(str(exc), "model_id") from exc
    named = body.model_copy(update={"path": name})
    return await _save(named, "sampler_weights", tenant, store, False, sampler.id)


@router.post("/save_weights_external")
async def save_weights_external(
    body: SaveWeights, tenant: TenantDep, store: StoreDep
) -> dict[str, Any]:
    return await _save(body, "external_weights", tenant, store, optimizer=False)


async def _saved(
    services: ServicesDep, store: TinkerStore, tenant: str, path: str
) -> tuple[TinkerModelRow, str, dict[str, Any]]:
    """The saved checkpoint a path names, of the caller's own models: (its model, its
    prefix, its lorafleet.json). 404 naming `path` when it is not there."""
    model_id, checkpoint_id = parse_tinker_path(path)
    try:
        model = await run_in_threadpool(store.model, tenant, model_id)
    except NotFound:
        raise NotFound("checkpoint", path, param="path") from None
    prefix = tinker_checkpoint_prefix(tenant, model.id, checkpoint_id)
    objects: ObjectStore = services.objects
    if not await run_in_threadpool(objects.exists, prefix + ABOUT):
        raise NotFound("checkpoint", path, param="path")
    about = json.loads(await run_in_threadpool(objects.get_bytes, prefix + ABOUT))
    return model, prefix, about


@router.post("/load_weights")
async def load_weights(
    body: LoadWeights, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    _, prefix, about = await _saved(services, store, tenant, body.path)
    payload: dict[str, Any] = {"prefix": prefix, "path": body.path, "optimizer": body.optimizer}
    if body.optimizer and not body.path.split("/")[-2] == "weights":
        raise InvalidRequest("path: optimizer state is saved with save_weights only", "path")
    if body.model_id is not None:
        if body.seq_id is None:
            raise InvalidRequest("seq_id: required with model_id", "seq_id")
        return await write_request(
            store, tenant, body.model_id, body.seq_id, "load_weights", payload
        )
    if body.session_id is None or body.model_seq_id is None:
        raise InvalidRequest("model_id, or session_id with model_seq_id, is required", "model_id")
    lora = {k: about[k] for k in ("rank", "seed", "train_mlp", "train_attn", "train_unembed")}
    try:
        row = await run_in_threadpool(
            store.create_model,
            tenant,
            body.session_id,
            body.model_seq_id,
            about["base_model"],
            lora,
            ("load_weights", {**payload, "create": lora}),
        )
    except SessionEnded as exc:
        raise InvalidRequest(str(exc), "session_id") from exc
    return {"request_id": row.id, "model_id": row.model_id}


@router.get("/training_runs/{model_id}/checkpoints/{checkpoint_path:path}")
async def external_weights_urls(
    model_id: str, checkpoint_path: str, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    """`…/checkpoints/external_weights/{name}/external_weights_urls`: a URL per file of the
    PEFT adapter (presigned on S3; a file:// URL on a local store, for a client on the
    same machine)."""
    checkpoint_id, _, what = checkpoint_path.rpartition("/")
    if what != "external_weights_urls" or not checkpoint_id.startswith("external_weights/"):
        raise NotFound("checkpoint", f"tinker://{model_id}/{checkpoint_path}", param="path")
    _, prefix, _ = await _saved(services, store, tenant, f"tinker://{model_id}/{checkpoint_id}")
    objects: ObjectStore = services.objects
    urls = {}
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        url = await run_in_threadpool(objects.presigned_url, prefix + name, URL_SECONDS)
        if url is None and isinstance(objects, LocalObjectStore):
            url = (objects.root / (prefix + name)).as_uri()
        if url is None:
            raise InvalidRequest("this object store hands out no download URLs", "path")
        urls[name] = url
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=URL_SECONDS)
    return {"urls": urls, "expires": expires.isoformat()}
