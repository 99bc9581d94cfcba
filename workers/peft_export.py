"""Writing one job's adapter in PEFT format: adapter_config.json + adapter_model.safetensors.

Only the job's own LoRA factors of linear layers, under the key names peft gives an
adapter trained alone, so `PeftModel.from_pretrained` and vLLM load it as it is.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from core.spec import JobSpec
from workers.packed_lora import slot_state_dict, target_module_names


def export_peft_adapter(model: nn.Module, job: JobSpec, paths: list[str], folder: Path) -> None:
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
        slot_state_dict(model, job.job_id),
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
