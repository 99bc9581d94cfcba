"""Writing one job's adapter in PEFT format: adapter_config.json + adapter_model.safetensors.

Only the job's own LoRA factors of linear layers, under the key names peft gives an
adapter trained alone, so `PeftModel.from_pretrained` and vLLM load it as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.spec import JobSpec
from workers.lora.packed_layer import slot_state_dict, target_module_names


def export_peft_adapter(model: nn.Module, job: JobSpec, paths: list[str], folder: Path) -> None:
    write_peft_adapter(slot_state_dict(model, job.job_id), job, paths, folder)


def write_peft_adapter(
    state: dict[str, torch.Tensor], job: JobSpec, paths: list[str], folder: Path
) -> None:
    """Writes a slot's factors taken earlier (`slot_state_dict`): a pack host takes them at
    the step boundary and writes them off the training path, while training goes on."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    lora = job.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.dropout,
        target_modules=target_module_names(paths),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=job.base_model,
    )
    config.inference_mode = True
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(
        state,
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
