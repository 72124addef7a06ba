"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, this module joins them.

    torchrun --nproc-per-node N -m lmlab train --parallel ddp|fsdp ...

- ddp:  DistributedDataParallel; every rank holds the whole model, gradients are all-reduced.
- fsdp: FSDP2 `fully_shard`, applied to every transformer block and then to the root; parameters, gradients and
        optimizer state are sharded (DTensors). On CUDA the parameters are cast to bf16 for compute.

The model file knows nothing of this: wrapping happens here, from outside. Backend: gloo on CPU, nccl on CUDA.
Every collective has a timeout, so a rank that dies ends the job with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .common import LmlabError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class Dist:
    """Where this process stands: its rank among `world` processes and how the model is spread over them."""

    strategy: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the logs, the progress bar, samples and single-file checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job (--max-restarts)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def setup(strategy: str, device: torch.device, timeout_s: float) -> Dist:
    """Join the process group torchrun prepared (or make a one-process group when run without torchrun)."""
    if strategy not in STRATEGIES:
        raise LmlabError(f"--parallel must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "none":
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise LmlabError("started by torchrun with several processes: choose --parallel ddp or --parallel fsdp")
        return Dist()
    if not launched_by_torchrun():  # one process on its own: a group of one, so the same code path runs
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                    world_size=world, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - rendezvous failures come as many types
            raise LmlabError(f"could not join the process group ({backend}): {str(e).splitlines()[0]}") from None
    return Dist(strategy, rank, world, local_rank)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys kept apart per elastic restart.

    After a restart the store can still hold the addresses the dead processes published; without a fresh prefix
    a new rank may read one of them and fail to connect.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent hosts the store
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"lmlab/attempt_{restart_count()}", store)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """Each rank gets its own GPU (cuda:LOCAL_RANK); on CPU all share the CPU."""
    if device.type == "cuda" and d.active:
        return torch.device("cuda", d.local_rank)
    return device


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The model to train: DDP around it, or FSDP2 shards of every block and of the root (in place)."""
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:  # the model interface (model.py): every architecture has the list
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is itself)."""
    return getattr(model, "module", model)


def no_sync(model: nn.Module, d: Dist, last_micro_step: bool):
    """Skip the gradient all-reduce / reduce-scatter on every micro-step but the last of an optimizer step."""
    if d.strategy == "ddp" and not last_micro_step:
        return model.no_sync()
    if d.strategy == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Collectives (no-ops for one process)


def all_reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active and d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(d: Dist) -> None:
    if d.active and d.world > 1:
        dist.barrier()


def broadcast_str(text: str, d: Dist) -> str:
    """Rank 0's string on every rank (e.g. the run directory, whose default name has a timestamp)."""
    if not (d.active and d.world > 1):
        return text
    box = [text if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value of `t` (gathers a sharded DTensor; collective in that case)."""
    return t.full_tensor() if is_sharded(t) else t


def is_sharded(t: torch.Tensor) -> bool:
    """Whether t is a DTensor. Cheap enough for every optimizer step: importing torch.distributed.tensor takes
    about 0.6 s, and until something has imported it no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this rank's shard when param is a DTensor (no communication), else itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full


def full_state_dict(model: nn.Module, d: Dist) -> Optional[dict[str, torch.Tensor]]:
    """The whole model's weights as plain CPU tensors on rank 0 (None elsewhere). Collective under FSDP."""
    if d.sharded:  # every rank takes part in gathering each tensor; rank 0 keeps the result
        sd = {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}
        return sd if d.main else None
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if d.main else None


def lost_peer(e: Exception, d: Dist) -> bool:
    """A collective failed because another rank died or timed out (gloo and nccl say so in several ways)."""
    if not d.active or isinstance(e, LmlabError):
        return False
    return isinstance(e, (RuntimeError, OSError)) and any(
        word in str(e) for word in ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out", "Timeout", "peer"))
