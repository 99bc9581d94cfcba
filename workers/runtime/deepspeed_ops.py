"""DeepSpeed's compiled ops, built once per installation and never inside a training run.

DeepSpeed JIT-compiles `deepspeed_shm_comm` (its CPU shared-memory all-reduce) on first use
into `TORCH_EXTENSIONS_DIR`, under a `lock` file that torch waits on with no time limit
even when the op is already built: a build killed half-way leaves the lock and every later
run hangs in setup. So the op is built here, in a controlled step (`make install`, or
`python -m workers.runtime.deepspeed_ops`), into a folder the installation owns and keyed by the
torch and DeepSpeed versions, built aside and renamed into place (no lock is ever left in
the final folder). A run uses that folder; if the op is not there, or a lock is, the run
goes without it (gloo's own collectives, correct and a little slower) instead of waiting.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

OP = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """This installation's folder for compiled ops, keyed by the torch and DeepSpeed versions."""
    import deepspeed
    import torch

    key = f"torch-{torch.__version__}-ds-{deepspeed.__version__}".replace("+", "_")
    return Path(sys.prefix) / "torch_extensions" / key


def op_ready(folder: Path) -> bool:
    """The op is built in `folder` and nobody holds (or left) its build lock."""
    built = list(folder.glob(f"{OP}/{OP}*.so"))
    return bool(built) and not (folder / OP / "lock").exists()


def use_prebuilt_ops() -> bool:
    """Called at a run's setup, before DeepSpeed starts: points torch at the installation's
    folder, and switches the op off if it is not ready there, so setup never compiles and
    never waits on a lock. True when the op is used."""
    import deepspeed.ops

    folder = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    ready = op_ready(folder)
    if not ready:
        deepspeed.ops.__compatible_ops__[OP] = False
    return ready


def build_ops() -> Path:
    """Builds the op into a fresh folder beside the final one, then renames it into place."""
    final = extensions_dir()
    if op_ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".build-", dir=final.parent))
    os.environ["TORCH_EXTENSIONS_DIR"] = str(staging)
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # not a CPU accelerator (a GPU machine): nothing to build
        final.mkdir(parents=True, exist_ok=True)
        return final
    builder.load(verbose=False)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(f"DeepSpeed ops ready in {build_ops()}")
