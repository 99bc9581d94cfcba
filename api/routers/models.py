"""/v1/models: the base models of the catalog and the fine-tuned adapters of this tenant."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ServicesDep, TenantDep
from api.schemas import ErrorResponse, ListPage, ModelDeleted, ModelObject
from orchestrator.errors import NotFound
from orchestrator.merges import delete_model
from orchestrator.store.merges import merge_store

router = APIRouter(prefix="/v1/models", tags=["models"])


def _models(services: ServicesDep, tenant: str) -> list[ModelObject]:
    models = [
        ModelObject(id=name, created=0, owned_by="lorafleet")
        for name in sorted(services.settings.base_models)
    ]
    for job in services.store.fine_tuned_models(tenant):
        assert job.fine_tuned_model is not None
        models.append(
            ModelObject(id=job.fine_tuned_model, created=job.finished_at or 0, owned_by=tenant)
        )
    return models


@router.get("", response_model=ListPage[ModelObject], responses={401: {"model": ErrorResponse}})
def list_models(services: ServicesDep, tenant: TenantDep) -> ListPage[ModelObject]:
    return ListPage[ModelObject](data=_models(services, tenant))


@router.get(
    "/{model_id:path}",
    response_model=ModelObject,
    responses={code: {"model": ErrorResponse} for code in (401, 404)},
)
def retrieve_model(services: ServicesDep, tenant: TenantDep, model_id: str) -> ModelObject:
    for model in _models(services, tenant):
        if model.id == model_id:
            return model
    raise NotFound("model", model_id, "model")


@router.delete(
    "/{model_id:path}",
    response_model=ModelDeleted,
    responses={code: {"model": ErrorResponse} for code in (401, 403, 404)},
)
def delete(services: ServicesDep, tenant: TenantDep, model_id: str) -> ModelDeleted:
    """Deletes a fine-tuned model (`client.models.delete`): its adapter, checkpoints and
    merged weights leave the store and its downloads answer 404; its job stays, with an
    event saying so. Another tenant's model, or one already deleted, is 404."""
    delete_model(
        services.store,
        merge_store(services.store.engine),
        services.objects,
        services.settings.base_models,
        tenant,
        model_id,
    )
    return ModelDeleted(id=model_id)
