"""
Processes and devices: torchrun setup (DDP or FSDP2), the all-reduce helpers, per-rank seeds,
and putting a model on its device: wrapped in DDP or sharded by FSDP2 to train, or placed
frozen. It takes plain values, not a training config, and imports no algorithm module.
"""
import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Block, GPTConfig


@dataclass
class Dist:
    ddp: bool
    """launched by torchrun: a process group exists (whatever --parallel says)"""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    sharded: bool = False
    """--parallel fsdp under torchrun: every forward is collective, so every rank must run each one"""
    owns_group: bool = True
    """this run set the process group up (and tears it down); compare.py's stages share the study's"""

    @property
    def master(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


def setup_distributed(device_name: str, parallel: str = "ddp", timeout: datetime.timedelta | None = None) -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process (and
    --parallel has nothing to do). gloo on CPU, nccl on CUDA; each process takes the GPU of its
    local rank. A process group that exists already (compare.py's, around the stages it runs) is
    used as it is: one torchrun launch cannot set a second one up after the first is torn down."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(True, rank, local_rank, world_size, device, sharded=parallel == "fsdp", owns_group=owns)


def cleanup_distributed(dist: Dist, finished: bool) -> None:
    """Tear the process group down. Every run first frees what still holds the group (a DDP or
    FSDP wrapper left in a reference cycle would otherwise be destroyed during interpreter
    shutdown, with gloo's threads still running: "terminate called without an active exception",
    status -6, seen on a run stopped by Ctrl-C); a finished one then waits for every rank, so no
    rank closes its connections while another is still writing (a stopped rank cannot know the
    others stopped too)."""
    if not dist.ddp:
        return
    gc.collect()
    if finished:
        torch_dist.barrier()
    if dist.owns_group:
        torch_dist.destroy_process_group()


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (a weight, gradient or norm sharded by FSDP). FSDP and DTensor take
    about a second to import, which only runs that shard pay (`shard` imports them): while nothing
    has imported DTensor, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def barrier(dist: Dist) -> None:
    if dist.ddp:
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.ddp:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def seed_everything(seed: int, dist: Dist) -> None:
    """Each rank gets its own stream (seed + rank), as in nanoGPT, so dropout differs by rank."""
    torch.manual_seed(seed + dist.rank)


def wrap_model(model: torch.nn.Module, dist: Dist, dtype: str, compile: bool) -> torch.nn.Module:
    """The model on the device: under torchrun in DDP, or sharded by FSDP; then optionally
    compiled. Keep a reference to the raw module: it is what saves, loads and samples. FSDP
    shards in place, so build the optimizer after this."""
    if dist.sharded:
        shard(model, dtype, dist.device)
    else:
        model.to(dist.device)
        if dist.ddp:
            model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def place_frozen(model: torch.nn.Module, dist: Dist, dtype: str) -> torch.nn.Module:
    """A model that does not train (a reference, a reward model) on the device, in eval mode and
    without gradients; under FSDP sharded too, so each rank holds 1/world_size of it."""
    model.eval().requires_grad_(False)
    if dist.sharded:
        shard(model, dtype, dist.device)
    else:
        model.to(dist.device)
    return model


def shard(model: torch.nn.Module, dtype: str, device: torch.device) -> None:
    """FSDP2 (Zhao et al. 2023; torch.distributed.fsdp.fully_shard) in place: each transformer
    block is one unit, all-gathered just before it runs and freed after; the embeddings, final
    norm and heads are the root's unit. Every rank keeps 1/world_size of each weight, gradient
    and optimizer state. Under bfloat16 the gathered weights are cast to bfloat16 for compute and
    gradients are reduced in float32 (the sharded master weights stay float32). generate and
    values run outside forward, so they are registered to gather the root's weights too; a
    module made of models (PPO's policy and critic) shards each model as a root of its own.
    The model comes in on the CPU and goes to the device one unit at a time, as it is sharded,
    so no device ever holds a whole model; rank 0's weights of each unit are broadcast first, as
    DDP does, since a new model is initialised per rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    # PPO's policy and critic train as one module, but rollouts and scoring call each alone, and
    # FSDP2 makes the first unit called the root of the units below it: each model is a root
    def is_model(m):  # a GPT or a reward model (a GPT with a head): a module with a model config
        return isinstance(getattr(m, "config", None), GPTConfig)
    parts = [] if is_model(model) else [m for m in model.children() if is_model(m)]
    for unit in [*(m for m in model.modules() if isinstance(m, Block)), *(parts or [model])]:
        for t in [*unit.parameters(), *unit.buffers()]:
            if not is_dtensor(t):  # not sharded already with a unit below
                t.data = t.data.to(device)
                torch_dist.broadcast(t.data, src=0)
        fully_shard(unit, mp_policy=policy)
        for method in ("generate", "values"):
            if hasattr(unit, method):
                register_fsdp_forward_method(unit, method)
