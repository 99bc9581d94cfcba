"""The packed multi-adapter layer against peft: K=1 equals one peft adapter, K>1 equals K
separate peft models, in outputs and in gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from workers.lora.packed_layer import (
    NO_ADAPTER,
    PackedLoraLinear,
    Routing,
    SlotConfig,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)

JOBS = [
    SlotConfig("job-a", r=4, alpha=8.0),
    SlotConfig("job-b", r=2, alpha=16.0),
    SlotConfig("job-c", r=8, alpha=4.0),
]
TARGETS: list[str | list[str]] = ["all-linear", ["q_proj", "v_proj"], ["down_proj"]]


@pytest.fixture(scope="module")
def base(tiny_base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def peft_reference(base: torch.nn.Module, slot: SlotConfig, target: str | list[str], seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=slot.r, lora_alpha=slot.alpha, target_modules=target, lora_dropout=0.0),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make it matter
            torch.nn.init.normal_(param, std=0.1)
    return model


def packed_from(
    base: torch.nn.Module, references: list, targets: list
) -> tuple[torch.nn.Module, Routing]:  # type: ignore[type-arg]
    """Our packed model, holding exactly the factors of each peft reference."""
    model = copy.deepcopy(base)
    routing = Routing()
    paths = {s.name: matching_linear_layers(model, t) for s, t in zip(JOBS, targets, strict=False)}
    layers = wrap_linear_layers(model, sorted({p for ps in paths.values() for p in ps}), routing)
    for slot, reference in zip(JOBS, references, strict=False):
        ref_state = dict(reference.named_parameters())
        for path in paths[slot.name]:
            layers[path].add_slot(slot, torch.Generator().manual_seed(0), torch.device("cpu"))
            prefix = f"base_model.model.{path}"
            with torch.no_grad():
                layers[path].lora_A[slot.name].copy_(ref_state[f"{prefix}.lora_A.default.weight"])
                layers[path].lora_B[slot.name].copy_(ref_state[f"{prefix}.lora_B.default.weight"])
    return model, routing


def batch(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 400, (rows, 7), generator=torch.Generator().manual_seed(seed))


def test_one_slot_equals_peft(base: torch.nn.Module) -> None:
    reference = peft_reference(base, JOBS[0], "all-linear", seed=1)
    model, routing = packed_from(base, [reference], ["all-linear"])
    inputs = batch(3, seed=2)
    routing.blocks = [("job-a", 3)]
    assert torch.allclose(model(inputs).logits, reference(inputs).logits, atol=1e-6)
    # The same tensors under the same names as peft saves them.
    from peft import get_peft_model_state_dict

    ours = slot_state_dict(model, "job-a")
    theirs = get_peft_model_state_dict(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_k_slots_equal_k_separate_peft_models_in_outputs_and_gradients(
    base: torch.nn.Module,
) -> None:
    references = [
        peft_reference(base, s, t, seed=i)
        for i, (s, t) in enumerate(zip(JOBS, TARGETS, strict=True))
    ]
    model, routing = packed_from(base, references, TARGETS)
    inputs = [batch(2, seed=10), batch(3, seed=11), batch(1, seed=12)]
    routing.blocks = [(s.name, len(x)) for s, x in zip(JOBS, inputs, strict=True)]
    logits = model(torch.cat(inputs)).logits
    # Each job's own mean loss, summed: gradients must not mix between jobs.
    losses, start = [], 0
    for x in inputs:
        losses.append(logits[start : start + len(x)].logsumexp(-1).mean())
        start += len(x)
    torch.stack(losses).sum().backward()
    start = 0
    for slot, reference, x in zip(JOBS, references, inputs, strict=True):
        expected = reference(x).logits
        assert torch.allclose(logits[start : start + len(x)], expected, atol=1e-5)
        start += len(x)
        expected.logsumexp(-1).mean().backward()
        ref_params = dict(reference.named_parameters())
        ours = iter(slot_parameters(model, slot.name))  # sorted by path: A, B, A, B, …
        paths = matching_linear_layers(model, TARGETS[JOBS.index(slot)])
        for path in paths:
            for factor in ("lora_A", "lora_B"):
                theirs = ref_params[f"base_model.model.{path}.{factor}.default.weight"].grad
                mine = next(ours).grad
                assert mine is not None and theirs is not None
                assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7), (path, factor)
        assert next(ours, None) is None


def test_a_layer_a_job_does_not_adapt_leaves_its_rows_unchanged(base: torch.nn.Module) -> None:
    model = copy.deepcopy(base)
    routing = Routing()
    layers = wrap_linear_layers(model, matching_linear_layers(model, ["q_proj"]), routing)
    for layer in layers.values():
        layer.add_slot(JOBS[0], torch.Generator().manual_seed(0), torch.device("cpu"))
        torch.nn.init.normal_(layer.lora_B["job-a"])
    inputs = batch(4, seed=3)
    routing.blocks = [("job-a", 2), (NO_ADAPTER, 2)]
    packed = model(inputs).logits
    plain = base(inputs).logits
    assert torch.allclose(packed[2:], plain[2:], atol=1e-6)
    assert not torch.allclose(packed[:2], plain[:2], atol=1e-3)


def test_routing_must_cover_the_batch(base: torch.nn.Module) -> None:
    layer = PackedLoraLinear(torch.nn.Linear(4, 4), Routing())
    layer.routing.blocks = [(NO_ADAPTER, 1)]
    with pytest.raises(ValueError, match="covers 1 rows"):
        layer(torch.zeros(2, 4))


def test_routing_to_an_unknown_slot_is_an_error_not_a_zero_delta() -> None:
    layer = PackedLoraLinear(torch.nn.Linear(4, 4), Routing())
    layer.add_slot(JOBS[0], torch.Generator().manual_seed(0), torch.device("cpu"))
    layer.routing.blocks = [("job-a", 1), ("job-typo", 1)]
    with pytest.raises(KeyError, match="job-typo"):
        layer(torch.zeros(2, 4))
    layer.remove_slot("job-a")
    layer.routing.blocks = [("job-a", 2)]
    with pytest.raises(KeyError, match="job-a"):
        layer(torch.zeros(2, 4))


def test_bf16_layer_equals_peft_bit_for_bit() -> None:
    """The delta is added in fp32 and rounded once, as peft does (bf16 base, fp32 factors)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_layer = torch.nn.Sequential()
    base_layer.add_module("proj", torch.nn.Linear(256, 256, bias=False).to(torch.bfloat16))
    slot = SlotConfig("job-a", r=8, alpha=16.0)
    reference = get_peft_model(
        copy.deepcopy(base_layer), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])
    )
    ref_layer = reference.base_model.model.proj
    assert ref_layer.lora_A["default"].weight.dtype == torch.float32  # peft's own upcast
    torch.nn.init.normal_(ref_layer.lora_B["default"].weight, std=0.05)
    routing = Routing()
    ours = PackedLoraLinear(copy.deepcopy(base_layer.proj), routing)
    ours.add_slot(slot, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        ours.lora_A["job-a"].copy_(ref_layer.lora_A["default"].weight)
        ours.lora_B["job-a"].copy_(ref_layer.lora_B["default"].weight)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    routing.blocks = [("job-a", 64)]
    mine, theirs = ours(x), reference(x)
    assert mine.dtype == theirs.dtype == torch.bfloat16
    differing = (mine != theirs).float().mean().item()
    assert differing == 0.0, f"{differing:.1%} of outputs differ from peft"


def test_all_linear_leaves_out_the_output_layer(base: torch.nn.Module) -> None:
    paths = matching_linear_layers(base, "all-linear")
    assert "lm_head" not in paths and len(paths) == 2 * 7
    assert matching_linear_layers(base, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
