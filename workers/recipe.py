"""One LoRA fine-tuning run, as seen from one Ray Train worker (rank).

Lifecycle: setup (data, base model loaded already partitioned by ZeRO-3, LoRA factors,
DeepSpeed engine) → train (one step per global batch; rank 0 reports metrics) → save
(LoRA factors gathered from all ranks, written in PEFT format, published) → cleanup.

    frozen W (partitioned across ranks) ──┐
    x ──▶ W·x + (alpha/r)·B·A·x            │  only A and B train; B starts at zero
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.base_models import resolve_base_model
from workers.batching import micro_batch_per_rank, plan_batches, rank_share
from workers.deepspeed_config import build_deepspeed_config
from workers.examples import parse_jsonl
from workers.objectstore import open_object_store
from workers.publish import publish_adapter
from workers.spec import JobSpec, RunSpec
from workers.tokenization import TokenizedExample, collate, tokenize_example


class TrainingDataError(ValueError):
    """The job's data cannot be trained on (for example: nothing left after truncation)."""


def warmup_then_linear_decay(warmup_steps: int, total_steps: int):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


class LoRAFinetuneRecipe:
    def __init__(self, spec: RunSpec, reporter: Any) -> None:
        if len(spec.jobs) != 1:
            raise ValueError("LoRAFinetuneRecipe trains exactly one job per run")
        self.spec = spec
        self.job: JobSpec = spec.jobs[0]
        self.reporter = reporter  # the run's actor; only rank 0 talks to it

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_engine()

    def _setup_distributed(self) -> None:
        import deepspeed
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        if self.spec.use_gpu:
            self.device = torch.device("cuda", context.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Ray Train already created the process group; DeepSpeed adopts it as it is.
        deepspeed.init_distributed(dist_backend="nccl" if self.spec.use_gpu else "gloo")
        self.dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float32
        self.base_path = resolve_base_model(
            self.job.base_model_uri, self.spec.model_cache_dir, self.spec.object_store
        )

    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        training = self.job.training
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        store = open_object_store(self.spec.object_store)
        examples = parse_jsonl(store.get_bytes(self.job.training_file_key))
        tokenized = [tokenize_example(e, self.tokenizer, training.max_seq_len) for e in examples]
        self.examples: list[TokenizedExample] = [t for t in tokenized if t.trained_tokens > 0]
        if not self.examples:
            raise TrainingDataError(
                f"no example has a trained token within max_seq_len={training.max_seq_len}"
            )
        self.micro_batch = micro_batch_per_rank(training.batch_size, self.world_size)
        self.batches = plan_batches(
            len(self.examples),
            self.micro_batch * self.world_size,
            training.n_epochs,
            training.seed,
        )
        self.total_steps = len(self.batches)

    def _setup_model(self) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        self.ds_config = build_deepspeed_config(
            micro_batch_per_rank=self.micro_batch,
            precision=self.spec.precision,
            gradient_clip=self.job.training.gradient_clip,
            param_persistence_threshold=self.spec.zero3_param_persistence_threshold,
        )
        # Kept alive on purpose: while it exists, from_pretrained loads under zero.Init, so
        # every rank only ever materialises its own shard of the base.
        self._hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)
        base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        base.requires_grad_(False)
        lora = self.job.lora
        target = (
            lora.target_modules
            if isinstance(lora.target_modules, str)
            else list(lora.target_modules)
        )
        torch.manual_seed(self.job.training.seed)  # A's initialisation depends on it
        self.model = get_peft_model(
            base,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
                lora_dropout=lora.dropout,
                target_modules=target,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        # Users load the adapter by the catalog name, not by a worker's cache folder.
        self.model.peft_config["default"].base_model_name_or_path = self.job.base_model

    def _setup_engine(self) -> None:
        import deepspeed

        training = self.job.training
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=training.learning_rate, weight_decay=training.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_then_linear_decay(training.warmup_steps, self.total_steps)
        )
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )

    # ---- train -------------------------------------------------------------------------
    def _report(self, event: dict[str, Any]) -> None:
        if self.rank == 0:
            self.reporter.record.remote(event)

    def _stop_requested(self) -> bool:
        """Rank 0 asks the run's actor; every rank must agree, or collectives would hang."""
        import ray

        flag = torch.zeros(1, device=self.device)
        if self.rank == 0:
            flag[0] = float(ray.get(self.reporter.should_stop.remote()))
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def train(self) -> bool:
        """Runs every step; returns False if the run was asked to stop first."""
        self.engine.train()
        self._report(
            {
                "type": "message",
                "message": f"Training started: {self.total_steps} steps on {self.world_size} "
                f"workers, {len(self.examples)} examples, {self.spec.precision}",
                "data": {"total_steps": self.total_steps, "workers": self.world_size},
            }
        )
        trained_tokens = 0
        for step, batch in enumerate(self.batches, start=1):
            if self._stop_requested():
                return False
            started = time.perf_counter()
            shard = [self.examples[i] for i in rank_share(batch, self.rank, self.world_size)]
            inputs = {
                k: v.to(self.device) for k, v in collate(shard, self.tokenizer.pad_token_id).items()
            }
            loss = self.engine(**inputs).loss
            self.engine.backward(loss)
            self.engine.step()
            totals = torch.tensor(
                [loss.item(), float(inputs["attention_mask"].sum())], device=self.device
            )
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - started
            tokens = int(totals[1].item())
            trained_tokens += tokens
            mean_loss = totals[0].item() / self.world_size
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
            self._report(
                {
                    "type": "metrics",
                    "message": f"Step {step}/{self.total_steps}: training loss={mean_loss:.4f}",
                    "data": {
                        "step": step,
                        "total_steps": self.total_steps,
                        "train_loss": mean_loss,
                        "learning_rate": self.schedule.get_last_lr()[0],
                        "tokens_per_second": tokens / elapsed,
                        "step_seconds": elapsed,
                        "trained_tokens": trained_tokens,
                    },
                }
            )
        self._report_partitioning()
        return True

    def _report_partitioning(self) -> None:
        """How much of each frozen base weight this rank holds (ZeRO-3 shards), for all to see."""
        fractions = []
        base_requires_grad = 0
        held = 0
        for name, param in self.engine.module.named_parameters():
            if "lora_" in name:
                continue
            base_requires_grad += int(param.requires_grad)
            full = getattr(param, "ds_numel", param.numel())
            local = param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
            held += local
            fractions.append(local / full)
        mine = {
            "rank": self.rank,
            "base_elements_held": held,
            "min_fraction": min(fractions),
            "max_fraction": max(fractions),
            "base_params_requiring_grad": base_requires_grad,
        }
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        self._report(
            {
                "type": "message",
                "message": "Base weights held per rank: "
                + ", ".join(f"rank {g['rank']} {g['base_elements_held']}" for g in gathered),
                "data": {"partitioning": gathered},
            }
        )

    # ---- save --------------------------------------------------------------------------
    def save_adapter(self) -> None:
        """Gathers the LoRA factors from every rank and publishes them from rank 0.

        Under ZeRO-3 each rank holds a shard of A and B; saving without gathering writes
        empty tensors.
        """
        import deepspeed
        from peft import get_peft_model_state_dict

        lora_params = [p for n, p in self.engine.module.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
            if self.rank == 0:
                state = {
                    k: v.detach().clone().cpu()
                    for k, v in get_peft_model_state_dict(self.engine.module).items()
                }
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                self.engine.module.save_pretrained(folder, state_dict=state)
                store = open_object_store(self.spec.object_store)
                manifest = publish_adapter(store, self.job.tenant, self.job.job_id, Path(folder))
            self._report(
                {
                    "type": "published",
                    "message": "Adapter published",
                    "data": {"job_id": self.job.job_id, "files": manifest.files},
                }
            )
        dist.barrier()

    def cleanup(self) -> None:
        del self.engine, self.model, self.optimizer
        del self._hf_deepspeed_config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    recipe = LoRAFinetuneRecipe(config["spec"], config["reporter"])
    recipe.setup()
    if recipe.train():
        recipe.save_adapter()
    recipe.cleanup()
