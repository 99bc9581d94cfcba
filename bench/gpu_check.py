"""The prepared check for the day a GPU is lent: our training step, on the device, in bf16.

    python bench/gpu_check.py --device cpu            # CI: the tiny config, fp32 and bf16
    python bench/gpu_check.py --device cuda --size 1b # on a GPU machine

It trains a real pack (3 jobs, different ranks/learning rates/lengths) with the shared
step (`workers.host.step.train_step`: per-job widths, per-job losses, fp32 LoRA factors on
a bf16 base) in a one-rank process group (NCCL on a GPU, gloo on CPU), and reports:
tensors not on the device, dtypes, host syncs in one step, peak device memory, tokens/s
and MFU, packed vs alone, resume exactness, and whether a checkpoint written on the device
resumes on the CPU. The base is built from a local config (no hub): `--size 1b` is a
~1.1B-parameter Llama, randomly initialised (numerics, not quality, are checked).

What a GPU machine needs: torch with CUDA (there), transformers, peft, safetensors and
this project (`pip install --no-deps -e .` from a copy of the tree). DeepSpeed and Ray are
not used by this script, on purpose: the GPU machine has neither, and ZeRO-3 is exercised
in CI. To run the full Ray + DeepSpeed path there too, bring wheels built here:
`pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w wheels/` and
`pip download ray[train]==2.60.0 -d wheels/`, then `pip install --no-index wheels/*`.
Exit status 0 when every exactness check holds.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.spec import JobSpec, LoraSettings, TrainingSettings  # noqa: E402
from workers.data.tokenization import IGNORE_INDEX, TokenizedExample  # noqa: E402
from workers.host.slot import JobSlot  # noqa: E402
from workers.host.step import PackContext, train_step  # noqa: E402
from workers.lora.packed_layer import (  # noqa: E402
    Routing,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)
from workers.training.rng_state import restore_dropout_rng, saved_dropout_rng  # noqa: E402

SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
}  # fmt: skip
DTYPES = {
    p: {"base": str(d), "lora": "torch.float32", "adam_state": "torch.float32"}
    for p, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))
}
JOBS = [  # (r, alpha, learning rate, example lengths) — different on purpose
    (4, 8.0, 1e-2, (20, 60)),
    (8, 16.0, 5e-3, (40, 120)),
    (2, 4.0, 2e-2, (8, 24)),
]


def build_base(size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=1024)  # type: ignore[arg-type]
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # type: ignore[arg-type]
    model.requires_grad_(False)
    return model


def job_slot(index: int, vocab: int, steps: int, batch: int, dropout: float) -> JobSlot:
    r, alpha, lr, (short, long) = JOBS[index]
    spec = JobSpec(
        job_id=f"job-{index}",
        tenant="check",
        attempt=1,
        base_model="check",
        base_model_uri="",
        training_file_key="",
        lora=LoraSettings(r=r, alpha=alpha, dropout=dropout),
        training=TrainingSettings(n_epochs=1, batch_size=batch, learning_rate=lr, seed=index),
    )
    g = torch.Generator().manual_seed(100 + index)
    examples = []
    for _ in range(steps * batch):
        n = int(torch.randint(short, long + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    batches = [list(range(s * batch, (s + 1) * batch)) for s in range(steps)]
    return JobSlot(spec=spec, examples=examples, batches=batches, micro_batch=batch)


class Pack:
    """A model with packed LoRA layers and its slots, trained with the shared step."""

    def __init__(self, base: torch.nn.Module, slots: list[JobSlot], device: torch.device) -> None:
        self.model, self.routing, self.slots = copy.deepcopy(base), Routing(), slots
        paths = matching_linear_layers(self.model, "all-linear")
        layers = wrap_linear_layers(self.model, paths, self.routing)
        for slot in slots:
            init = slot.generator(2)
            for path in paths:
                layers[path].add_slot(slot.config, init, device)
            slot.setup_optimizer(slot_parameters(self.model, slot.job_id))
            if slot.spec.lora.dropout > 0:
                self.routing.generators[slot.job_id] = slot.generator(1, device)
        self.events: list[tuple[Any, ...]] = []
        self.ctx = PackContext(
            self.model, self.routing, 0, device, 0, 1, lambda *e: self.events.append(e)
        )
        self.model.train()

    def step(self) -> float:
        active = [s for s in self.slots if s.step < s.total_steps]
        started = time.perf_counter()
        train_step(self.ctx, active)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def factors(self, job_id: str) -> dict[str, torch.Tensor]:
        return slot_state_dict(self.model, job_id)


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check(size: str, device: torch.device, precision: str, steps: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = build_base(size, device, dtype)
    vocab = SIZES[size]["vocab_size"]
    report: dict[str, Any] = {"size": size, "device": device.type, "precision": precision}
    report["base_parameters"] = sum(p.numel() for p in base.parameters())

    def slots(*indices: int, dropout: float = 0.0) -> list[JobSlot]:
        return [job_slot(i, vocab, steps, 4, dropout) for i in indices]

    pack = Pack(base, slots(0, 1, 2), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pack.step()  # the first step warms kernels up; timed steps follow
    report["off_device"] = [
        n for n, t in [*pack.model.named_parameters(), *pack.model.named_buffers()]
        if t.device.type != device.type
    ]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pack.step()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    report["host_syncs_in_one_step"] = sum("synchroniz" in str(w.message) for w in caught)
    seconds = [pack.step() for _ in range(steps - 2)]
    slot = pack.slots[0]
    a_param = slot.params[0]
    exp_avg = slot.optimizer.state[a_param]["exp_avg"]  # type: ignore[union-attr]
    base_weight = next(p for n, p in pack.model.named_parameters() if "lora_" not in n)
    report["dtypes"] = {
        "base": str(base_weight.dtype),
        "lora": str(a_param.dtype),
        "adam_state": str(exp_avg.dtype),
    }
    losses = [e[3]["train_loss"] for e in pack.events if e[1] == "metrics" and e[0] == "job-0"]
    report["loss_first_last_job0"] = [losses[0], losses[-1]]
    tokens = sum(len(s.examples[0].input_ids) for s in pack.slots) * 4  # rough per step
    step_s = sum(seconds) / max(1, len(seconds)) if seconds else float("nan")
    report["tokens_per_second"] = tokens / step_s
    # LoRA training: forward 2N + backward through activations 2N FLOPs per token (no base
    # weight gradients), against the device's dense bf16 peak.
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    report["mfu"] = 4 * report["base_parameters"] * report["tokens_per_second"] / peak
    if device.type == "cuda":
        report["peak_device_bytes"] = torch.cuda.max_memory_allocated()

    # Packed vs alone: each job trained alone, the same steps.
    diffs = {}
    for i, packed_slot in enumerate(pack.slots):
        alone = Pack(base, slots(i), device)
        for _ in range(steps):
            alone.step()
        diffs[packed_slot.job_id] = worst(
            pack.factors(packed_slot.job_id), alone.factors(f"job-{i}")
        )
    report["packed_vs_alone_max_abs"] = diffs

    # Resume: stop half-way, checkpoint (bytes, loaded as the workers load them), resume.
    full = Pack(base, slots(1, dropout=0.1), device)
    for _ in range(steps):
        full.step()
    first = Pack(base, slots(1, dropout=0.1), device)
    for _ in range(steps // 2):
        first.step()
    saved = save_state(first)
    resumed = Pack(base, slots(1, dropout=0.1), device)
    load_state(resumed, saved, device)
    for _ in range(steps - steps // 2):
        resumed.step()
    report["resume_max_abs"] = worst(full.factors("job-1"), resumed.factors("job-1"))
    # A checkpoint written here resumes on the CPU (map_location, RNG state per device).
    on_cpu = Pack(copy.deepcopy(base).cpu(), slots(1, dropout=0.1), torch.device("cpu"))
    load_state(on_cpu, saved, torch.device("cpu"))
    on_cpu.step()
    report["device_checkpoint_resumes_on_cpu"] = True
    return report


def save_state(pack: Pack) -> bytes:
    slot = pack.slots[0]
    generator = pack.routing.generators[slot.job_id]
    state = slot.training_state(
        dropout_rng=saved_dropout_rng([generator.get_state()], generator.device.type),
        factors=pack.factors(slot.job_id),
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state(pack: Pack, saved: bytes, device: torch.device) -> None:
    state = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=True)
    slot = pack.slots[0]
    from workers.lora.packed_layer import load_slot_state

    load_slot_state(pack.model, slot.job_id, state["factors"])
    slot.restore(state)
    restore_dropout_rng(pack.routing.generators[slot.job_id], state["dropout_rng"], 0, 1, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or ("1b" if device.type == "cuda" else "tiny")
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.NamedTemporaryFile() as rendezvous:
        dist.init_process_group(
            backend, init_method=f"file://{rendezvous.name}", rank=0, world_size=1
        )
        precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
        reports = [check(size, device, p, args.steps) for p in precisions]
        dist.destroy_process_group()
    ok = True
    for report in reports:
        packed = max(report["packed_vs_alone_max_abs"].values())
        # On CPU bit for bit; on a GPU kernels depend on the batch shape: reported, and held
        # to the size of one bf16 step of the factors (README: "What holds on a GPU").
        packed_ok = packed == 0.0 if device.type == "cpu" else packed < 1e-2
        first, last = report["loss_first_last_job0"]
        fine = (
            packed_ok
            and report["resume_max_abs"] == 0.0
            and not report["off_device"]
            and last < first
            and report["dtypes"] == DTYPES[report["precision"]]
        )
        report["ok"] = fine
        ok = ok and fine
        print(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
