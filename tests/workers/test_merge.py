"""Merging an adapter into its base (workers/lora/merge.py), on tiny safetensors, without Ray:
the merged folder loaded by transformers gives peft's logits, shard by shard in bounded memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.lora.merge import MergeError, merge_adapter

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])


@pytest.fixture(scope="module")
def sharded_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in shards of ~100 kB (several of them), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded") / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(sharded_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter on every linear layer with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(folder)
    return folder


def peft_logits(base: Path, adapter: Path, scale: float) -> torch.Tensor:
    """The reference: base + adapter through peft, with the adapter's scale set."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    for module in model.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lora_A"):
            module.scale_layer(scale)  # peft's own knob: scaling *= scale
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_folder_loads_in_transformers_with_peft_logits(
    sharded_base: Path, adapter: Path, tmp_path: Path, scale: float
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finished: list[str] = []
    stats = merge_adapter(
        sharded_base, adapter, tmp_path, scale, on_file=lambda name, _p: finished.append(name)
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        logits = merged(PROMPT).logits
    expected = peft_logits(sharded_base, adapter, scale)
    base_logits = AutoModelForCausalLM.from_pretrained(sharded_base)(PROMPT).logits.detach()
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (logits - base_logits).abs().max().item() > 1e-2  # the adapter changed the model
    assert AutoTokenizer.from_pretrained(tmp_path).encode("hello") == AutoTokenizer.from_pretrained(
        sharded_base
    ).encode("hello")
    assert finished == stats.files and stats.merged_weights == 14  # 2 layers × 7 linear


def test_the_merge_holds_far_less_than_two_shards_whatever_the_model_size(
    sharded_base: Path, adapter: Path, tmp_path: Path
) -> None:
    shards = sorted(sharded_base.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    stats = merge_adapter(sharded_base, adapter, tmp_path, 1.0)
    print(
        f"shards={len(shards)} model={total} largest shard={stats.largest_shard_bytes} "
        f"largest merged weight={stats.largest_weight_bytes} peak={stats.peak_tensor_bytes}"
    )
    assert len(shards) >= 4 and total > 3 * stats.largest_shard_bytes  # the bound can fail
    assert stats.peak_tensor_bytes <= 2 * stats.largest_shard_bytes
    # What it holds is one weight and its fp32 block (plus the small factors), not a shard.
    assert stats.peak_tensor_bytes <= 3 * stats.largest_weight_bytes + 64 * 1024


def test_scale_zero_gives_the_base_bytes_and_a_bf16_base_stays_bf16(
    tiny_base: Path, adapter: Path, sharded_base: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    merge_adapter(sharded_base, adapter, tmp_path / "zero", 0.0)
    for shard in sharded_base.glob("*.safetensors"):
        assert (tmp_path / "zero" / shard.name).read_bytes() == shard.read_bytes()

    bf16 = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16)
    merge_adapter(bf16, adapter, tmp_path / "bf16", 1.0)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as merged:
        weight = merged.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert weight.dtype == torch.bfloat16


def test_an_adapter_of_another_base_is_refused(
    sharded_base: Path, adapter: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    state = {
        k.replace("layers.1.", "layers.9."): v
        for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
    }
    save_file(state, str(other / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="layers.9"):
        merge_adapter(sharded_base, other, tmp_path / "out", 1.0)
    with pytest.raises(MergeError, match="finite"):
        merge_adapter(sharded_base, adapter, tmp_path / "out", float("nan"))
