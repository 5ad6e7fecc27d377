"""
Plumbing that every training script shares, each piece with one obvious meaning: config
dataclass to command line, torchrun setup (DDP or FSDP2), device and dtype, seeding, the optimizer and its
schedule, the data order, one optimizer step with gradient accumulation, the run folder
(config, metrics, checkpoint, resume) and the script's main. No training loop and no algorithm
lives here: each train_X.py shows its own loop, and its loss lives in dpo.py, ppo.py,
reward_model.py or the script itself.
"""
import argparse
import ast
import dataclasses
import gc
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import textwrap
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint
from data import TOY_PAIRS, take
from files import DataError, make_out_dir, replace_atomically, write_atomic
from hf import load_folder
from lora import TARGETS, attach_lora, merge_lora
from model import GPT, Block, GPTConfig
from reward_model import RewardModel, backbone_state
from tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # Windows has no flock: there a second run on one folder is not refused
    fcntl = None

# -----------------------------------------------------------------------------
# Config: a dataclass whose fields carry a docstring each (the line below the field, as in
# cleanrl) becomes a command line with one --field flag per field and those docstrings as help.


def _field_docs(cls) -> dict[str, str]:
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first, so subclasses may override
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = nxt.value.value
    return docs


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's layout (its usage examples) and shows every default."""


def parse_config(cls, argv=None, description: str | None = None):
    """Build `cls` from command-line flags. Supports int, float, str, bool (`--flag` alone means
    true), Literal choices, and Optional[...] (the word none gives None)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints, docs = get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        typ, optional = hints[f.name], False
        if get_origin(typ) is Union:  # Optional[X]
            typ, optional = next(a for a in get_args(typ) if a is not type(None)), True
        kwargs = dict(default=f.default, help=docs.get(f.name, "").replace("%", "%%"))
        if get_origin(typ) is Literal:
            kwargs.update(choices=get_args(typ), type=type(get_args(typ)[0]))
        elif typ is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=typ, metavar=typ.__name__.upper())
        if optional:
            convert = kwargs["type"]
            kwargs["type"] = lambda text, convert=convert: None if text.lower() == "none" else convert(text)
        parser.add_argument(f"--{f.name}", **kwargs)
    return cls(**vars(parser.parse_args(argv)))


@dataclass
class TrainConfig:
    """The settings every training script shares; each script subclasses it, adds its own and
    may change defaults."""
    out_dir: str = "out/run"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    resume: bool = False
    """continue the run in out_dir from its checkpoint"""
    overwrite: bool = False
    """replace a run already in out_dir"""
    batch_size: int = 64
    """sequences (or pairs) per optimizer step, over all processes and micro-batches"""
    grad_accum: int = 1
    """micro-batches per optimizer step on each process"""
    max_iters: int = 1000
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate"""
    min_lr: float = 2e-4
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 50
    """steps of linear warmup"""
    lr_decay_iters: Optional[int] = None
    """step where the cosine decay ends; none: max_iters"""
    weight_decay: float = 0.1
    """AdamW weight decay, matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    log_interval: int = 10
    """steps between training-metric lines in metrics.jsonl"""
    eval_interval: int = 250
    """steps between held-out evaluations and checkpoints"""
    early_eval_interval: int = 0
    """steps between evaluations before early_eval_until, where a run moves fastest (0: eval_interval throughout)"""
    early_eval_until: int = 0
    """the step from which evaluations are eval_interval apart"""
    print_samples: int = 3
    """samples printed at each evaluation"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    compile: bool = False
    """torch.compile the model"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp keeps a whole copy of the model on every process; fsdp shards weights, gradients and optimizer state (FSDP2)"""
    seed: int = 1337
    """seeds the initialisation, the data order and the samples"""
    # memory
    grad_checkpoint: bool = False
    """recompute each block's activations in the backward pass instead of keeping them"""
    lora_rank: int = 0
    """train LoRA adapters of this rank instead of every weight (0: full fine-tuning); the checkpoint holds the adapters"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (lora_alpha / lora_rank) B A x"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input"""
    lora_targets: str = ",".join(TARGETS)
    """comma-separated projections that get adapters (Llama's names)"""
    lora_base: str = ""
    """where the base model of a LoRA checkpoint given as the input model now is, if it has moved (empty: the path it records)"""
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the weights that do not train (reference, reward model, LoRA's base); bfloat16 needs --dtype bfloat16"""
    # chat
    chat_template: str = "auto"
    """auto: the model's own template, or Zephyr's for conversation data when it has none; zephyr; none; or a Jinja file"""


# -----------------------------------------------------------------------------
# Distributed setup, device, dtype, seeds


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


def setup_distributed(device_name: str, parallel: str = "ddp") -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process (and
    --parallel has nothing to do). gloo on CPU, nccl on CUDA; each process takes the GPU of its
    local rank."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(True, rank, local_rank, world_size, device, sharded=parallel == "fsdp")


def cleanup_distributed(dist: Dist, finished: bool) -> None:
    """Tear the process group down. A finished run first frees what still holds the group (a
    DDP wrapper left in a reference cycle would otherwise be destroyed during interpreter
    shutdown, with gloo's threads still running) and waits for every rank, so no rank closes
    its connections while another is still writing."""
    if not dist.ddp:
        return
    if finished:
        gc.collect()
        torch_dist.barrier()
    torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.ddp:
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.ddp:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def autocast(device: torch.device, dtype: str):
    """bfloat16 runs matmuls under autocast with float32 master weights; float32 needs nothing."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int, dist: Dist) -> None:
    """Each rank gets its own stream (seed + rank), as in nanoGPT, so dropout differs by rank."""
    torch.manual_seed(seed + dist.rank)


# -----------------------------------------------------------------------------
# Optimizer, schedule, data order


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only; biases and
    LayerNorm gains are not decayed. Fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr at decay_iters."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, step: int, cfg: TrainConfig) -> float:
    """Set and return the learning rate of optimizer step `step` under cfg's schedule."""
    lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def global_batch(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Example indices of optimizer step `step`: a fresh permutation each epoch (the remainder
    of an epoch is dropped). A pure function of the step, so a resumed run sees the same data."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise SystemExit(f"error: batch_size {batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def micro_batches(indices: torch.Tensor, dist: Dist, grad_accum: int) -> list[torch.Tensor]:
    """This rank's share of a global batch, split into grad_accum micro-batches."""
    if len(indices) % (dist.world_size * grad_accum):
        raise SystemExit(f"error: batch_size {len(indices)} is not divisible by world size "
                         f"{dist.world_size} x grad_accum {grad_accum}")
    return list(indices.chunk(dist.world_size * grad_accum))[dist.rank::dist.world_size]


def shard_indices(n: int, dist: Dist, batch_size: int) -> list[torch.Tensor]:
    """This rank's share of a held-out set of n examples (every world_size-th row), in batches.
    Under FSDP every forward is collective, so a rank with a batch fewer than rank 0 (which has
    the most rows) gets an empty one to run with it."""
    batches = list(torch.arange(n)[dist.rank::dist.world_size].split(batch_size))
    if dist.sharded:
        batches += [torch.arange(0)] * (math.ceil(math.ceil(n / dist.world_size) / batch_size) - len(batches))
    return batches


# -----------------------------------------------------------------------------
# Settings and inputs, checked before anything is written


def check_training_settings(cfg: TrainConfig) -> None:
    """The settings every training script shares, each refused with one line naming its flag,
    before anything is read or written (a DataError: exit status 2)."""
    finite = math.isfinite
    rules = [
        ("batch_size", cfg.batch_size >= 1, "must be at least 1"),
        ("grad_accum", cfg.grad_accum >= 1, "must be at least 1"),
        ("max_iters", cfg.max_iters >= 0, "must be 0 or more"),
        ("lr", finite(cfg.lr) and cfg.lr > 0, "must be a finite number above 0"),
        ("min_lr", finite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr, "must be a finite number from 0 to --lr"),
        ("warmup_iters", cfg.warmup_iters >= 0, "must be 0 or more"),
        ("lr_decay_iters", cfg.lr_decay_iters is None or cfg.lr_decay_iters >= 1, "must be at least 1"),
        ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "must be a finite number, 0 or more"),
        ("beta1", 0 <= cfg.beta1 < 1, "must be in [0, 1)"),
        ("beta2", 0 <= cfg.beta2 < 1, "must be in [0, 1)"),
        ("grad_clip", finite(cfg.grad_clip) and cfg.grad_clip > 0, "must be a finite number above 0"),
        ("log_interval", cfg.log_interval >= 1, "must be at least 1"),
        ("eval_interval", cfg.eval_interval >= 1, "must be at least 1"),
        ("early_eval_interval", cfg.early_eval_interval >= 0, "must be 0 or more"),
        ("lora_rank", cfg.lora_rank >= 0, "must be 0 or more"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "must be in [0, 1)"),
    ]
    for flag, ok, why in rules:
        if not ok:
            raise DataError(f"--{flag} {getattr(cfg, flag)}: {why}")
    if cfg.frozen_dtype == "bfloat16" and cfg.dtype != "bfloat16":
        raise DataError("--frozen_dtype bfloat16 needs --dtype bfloat16 (autocast mixes the two)")


def check_batches(n: int, what: str, cfg: TrainConfig, dist: Dist) -> None:
    """A global batch of batch_size examples out of n, split evenly over processes and micro-batches."""
    if cfg.batch_size > n:
        raise DataError(f"--batch_size {cfg.batch_size}: more than the {n} {what}")
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise DataError(f"--batch_size {cfg.batch_size}: not divisible by {dist.world_size} process(es) x "
                        f"--grad_accum {cfg.grad_accum}")


def toy_default(value: str, toy_path: str, flag: str, model_path: str) -> str:
    """A data flag's value: as given, or when empty the toy task's file, which a user's own
    model (a Hugging Face folder) must never read silently."""
    if value:
        return value
    if os.path.isdir(model_path):
        raise DataError(f"--{flag}: required with a Hugging Face model ({model_path}); "
                        f"its default, {toy_path}, is the toy task's")
    return toy_path


def require_inputs(cfg, *flags: str) -> None:
    """Each named flag's file or folder exists; if not, one line naming the flag."""
    for flag in flags:
        path = getattr(cfg, flag)
        if path and not os.path.exists(path):
            raise DataError(f"--{flag} {path}: no such file or folder")


def check_pair_settings(cfg, dist: Dist) -> None:
    """The inputs of a DPO or reward-model run: the SFT model, and the pair files, which are the
    toy task's only for the toy model given none; its gold evaluation is on for the toy task."""
    require_inputs(cfg, "sft_ckpt")
    user_model, user_data = os.path.isdir(cfg.sft_ckpt), bool(cfg.train_file)
    cfg.train_file = toy_default(cfg.train_file, TOY_PAIRS[0], "train_file", cfg.sft_ckpt)
    if not user_data and not cfg.val_file:
        cfg.val_file = TOY_PAIRS[1]
    require_inputs(cfg, "train_file", "val_file")
    for flag in ("max_length", "max_prompt_length"):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 2:
            raise DataError(f"--{flag} {getattr(cfg, flag)}: must be at least 2")
    resolve_gold_eval(cfg, not user_model and (not user_data or bool(getattr(cfg, "eval_prompts", ""))), dist)


def resolve_gold_eval(cfg, toy: bool, dist: Dist) -> None:
    """--gold_eval unset: on for the toy task, off with a notice for a user's model or data,
    which the toy task's gold reward (a sentiment count over toy reviews) cannot score."""
    if cfg.gold_eval is None:
        cfg.gold_eval = toy
        if not toy and dist.master:
            print("note: the toy task's gold evaluation is off for your model or data (--gold_eval true forces it)")


def default_max_length(cfg, block_size: int, toy: bool) -> None:
    """--max_length unset: 64 tokens on the toy task, else the model's context up to TRL's 1024."""
    if cfg.max_length is None:
        cfg.max_length = 64 if toy else min(block_size, 1024)


def check_lengths(block_size: int, *parts: tuple[str, int]) -> None:
    """The parts of one sequence, (name, tokens) each (a flag, or what a file holds), within the
    model's context."""
    if sum(n for _, n in parts) > block_size:
        named = " + ".join(f"{name} {n}" if name.startswith("--") else f"{name} ({n} tokens)" for name, n in parts)
        raise DataError(f"{named} exceeds the model's context of {block_size} tokens")


# -----------------------------------------------------------------------------
# One optimizer step


class RunStopped(RuntimeError):
    """A run that cannot go on; run_script reports it and exits with status 1, leaving the last
    checkpoint."""


class NonFiniteLoss(RunStopped):
    """A NaN or infinite loss, gradient norm or weight."""


def _sums(loss_sum: torch.Tensor, metric_sums: dict) -> torch.Tensor:
    return torch.stack([loss_sum.detach().float(), *(v.detach().float() for v in metric_sums.values())])


def train_step(model, optimizer, batches: list, loss_fn, n_global: int, grad_clip: float,
               dist: Dist, ctx, step: int) -> dict[str, float]:
    """Forward and backward over this rank's micro-batches, then optimizer step number `step`.

    loss_fn(model, batch) -> (loss_sum, {name: sum}) returns sums over the batch's loss terms
    (tokens for SFT, pairs for DPO), not means. Dividing by n_global, the number of terms in the
    whole global batch, makes the gradient the global mean, whatever the world size and number
    of micro-batches (DDP and FSDP average gradients over ranks, hence the factor world_size).
    Gradients are reduced once, on the last micro-batch: under DDP the others run under no_sync,
    entered before their forward pass; under FSDP with gradient sync off, which keeps each
    micro-batch's unsharded gradients for the last one to reduce-scatter. Returns the global
    means of the loss and metrics, and grad_norm (before clipping; under FSDP the norm over every
    rank's shards); a non-finite loss raises NonFiniteLoss before the weights are touched."""
    sums = 0
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if dist.sharded else []
    for i, batch in enumerate(batches):
        sync = not dist.ddp or i == len(batches) - 1
        for unit in units:
            unit.set_requires_gradient_sync(sync, recurse=False)
        with nullcontext() if sync or dist.sharded else model.no_sync():
            with ctx:
                loss_sum, metric_sums = loss_fn(model, batch)
            (loss_sum * (dist.world_size / n_global)).backward()
        sums = sums + _sums(loss_sum, metric_sums)
    sums = all_reduce_sum(sums, dist) / n_global
    stats = dict(zip(["loss", *metric_sums], sums.tolist()))
    if not math.isfinite(stats["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: loss is {stats['loss']}")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    stats["grad_norm"] = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    if not math.isfinite(stats["grad_norm"]):  # a finite loss can still overflow a gradient: never step on it
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: gradient norm is {stats['grad_norm']}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def heldout_sums(model, data: dict[str, torch.Tensor], loss_fn, dist: Dist, ctx,
                 batch_size: int) -> dict[str, float]:
    """loss_fn (as in train_step) summed over a whole held-out set, sharded over ranks and
    all-reduced: {"loss": sum, name: sum, ...}. The caller divides by what it averages over."""
    sums = 0
    for idx in shard_indices(len(next(iter(data.values()))), dist, batch_size):
        with ctx:
            loss_sum, metric_sums = loss_fn(model, take(data, idx, dist.device))
        sums = sums + _sums(loss_sum, metric_sums)
    return dict(zip(["loss", *metric_sums], all_reduce_sum(sums, dist).tolist()))


# -----------------------------------------------------------------------------
# Models, checkpoints, resume, metrics


def wrap_model(model: torch.nn.Module, dist: Dist, cfg: TrainConfig) -> torch.nn.Module:
    """The model on the device: under torchrun in DDP, or sharded by FSDP; then optionally
    compiled. Keep a reference to the raw module: it is what saves, loads and samples. FSDP
    shards in place, so build the optimizer after this."""
    if dist.sharded:
        shard(model, cfg.dtype, dist.device)
    else:
        model.to(dist.device)
        if dist.ddp:
            model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def place_frozen(model: torch.nn.Module, dist: Dist, cfg: TrainConfig) -> torch.nn.Module:
    """A model that does not train (a reference, a reward model) on the device, in eval mode and
    without gradients; under FSDP sharded too, so each rank holds 1/world_size of it."""
    model.eval().requires_grad_(False)
    if dist.sharded:
        shard(model, cfg.dtype, dist.device)
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
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    # PPO's policy and critic train as one module, but rollouts and scoring call each alone, and
    # FSDP2 makes the first unit called the root of the units below it: each model is a root
    models = (GPT, RewardModel)
    parts = [] if isinstance(model, models) else [m for m in model.children() if isinstance(m, models)]
    for unit in [*(m for m in model.modules() if isinstance(m, Block)), *(parts or [model])]:
        for t in [*unit.parameters(), *unit.buffers()]:
            if not isinstance(t, DTensor):  # not sharded already with a unit below
                t.data = t.data.to(device)
                torch_dist.broadcast(t.data, src=0)
        fully_shard(unit, mp_policy=policy)
        for method in ("generate", "values"):
            if hasattr(unit, method):
                register_fsdp_forward_method(unit, method)


def load_gpt(path: str, dtype: torch.dtype | None = torch.float32,
             lora_base: str = "") -> tuple[GPT, Tokenizer, dict]:
    """The model, its tokenizer and the whole checkpoint (empty for a folder), from a ckpt.pt of
    any stage or a Hugging Face model folder. Weights come in float32 by default, the master
    weights training needs (autocast does the bfloat16 compute); dtype=None keeps the stored one.
    A LoRA run's checkpoint holds adapters only: they are put on its base model and merged; the
    base is the one it records, or `lora_base` where that base has moved."""
    if os.path.isdir(path):
        model, tok = load_folder(path, dtype)
        return model, tok, {}
    ckpt = load_checkpoint(path)
    if "head.proj.weight" in ckpt["model"]:
        raise DataError(f"{path}: a reward model's checkpoint, not a language model's")
    if "lora" in ckpt:
        model = _attach_recorded(_lora_base(path, ckpt, lora_base), ckpt)
        load_trainable(model, ckpt["model"], path)
        merge_lora(model)
    else:
        model = _checkpointed(GPT, path, _model_config(path, ckpt), ckpt["model"])
    return model.to(dtype), Tokenizer.from_state(ckpt["tokenizer"], path), ckpt


def _model_config(path: str, ckpt: dict) -> GPTConfig:
    """A checkpoint's model_config, every value checked before anything is built."""
    try:
        return GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:  # an unknown key or a bad value
        raise DataError(f"{path}: model_config: {e}") from None


def _checkpointed(cls, path: str, config: GPTConfig, state: dict) -> torch.nn.Module:
    """A `cls` (GPT or RewardModel) of `config` holding a checkpoint's `state`. The stored tensors'
    names and shapes are compared with a model built on the meta device first, so a config that
    claims terabytes is refused before anything is allocated."""
    layers = {int(m[1]) for name in state if (m := re.search(r"\bh\.(\d+)\.", name))}
    if layers != set(range(config.n_layer)):  # first, as building even on meta takes a while a layer
        raise DataError(f"{path}: model_config says {config.n_layer} layers, the weights hold {len(layers)}")
    with torch.device("meta"):
        expected = cls(config).state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise DataError(f"{path}: the weights do not match model_config: missing {missing[:4] or 'none'}, "
                        f"unexpected {unexpected[:4] or 'none'}")
    for name, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                and tensor.shape == expected[name].shape):
            raise DataError(f"{path}: {name} is not a floating-point tensor of shape {list(expected[name].shape)}, "
                            "as model_config implies")
    model = cls(config)  # initialised, then overwritten: its random draws keep every seeded run's numbers
    model.load_state_dict(state)
    return model


def load_reward_model(path: str, lora_base: str = "") -> tuple[RewardModel, Tokenizer]:
    """A reward model and its tokenizer from train_rm.py's ckpt.pt (LoRA adapters merged on the
    base it records, or on `lora_base` where that base has moved)."""
    ckpt = load_checkpoint(path)
    if "lora" in ckpt:
        model = RewardModel.from_gpt(_lora_base(path, ckpt, lora_base))
        _attach_recorded(model.backbone, ckpt)  # the head trains and is in the checkpoint
        load_trainable(model, ckpt["model"], path)
        merge_lora(model)
    else:
        config = _model_config(path, ckpt)
        model = _checkpointed(RewardModel, path, config, backbone_state(ckpt["model"], config))
    return model, Tokenizer.from_state(ckpt["tokenizer"], path)


def _lora_base(path: str, ckpt: dict, moved_to: str = "") -> GPT:
    """The base model of a LoRA checkpoint, refused unless its files are the ones the adapters
    were trained on: adapters merged onto other weights give a model no one trained."""
    recorded = ckpt["lora"]["base"]
    base = moved_to or recorded
    if not os.path.exists(base):
        raise DataError(f"{path}: holds LoRA adapters of the base model {base}, which does not exist "
                        "(give its new place with --lora_base)")
    expected = ckpt["lora"].get("fingerprint")
    if expected is None:
        print(f"warning: {path} records no fingerprint of its LoRA base; assuming {base} holds the weights "
              "its adapters were trained on", file=sys.stderr)
    elif fingerprint(base) != expected:
        raise DataError(f"{path}: its LoRA adapters were trained on the base model at {recorded}, and {base} "
                        "holds other weights (give the original's place with --lora_base)")
    return load_gpt(base)[0]


def fingerprint(path: str) -> str:
    """The sha256 of a model's files: a ckpt.pt, or a folder's config.json and safetensors weights.
    Files, not tensors: a training run holds its base in --frozen_dtype, sharded, adapters on,
    while the files are what the run and every later load read alike. Streamed (a 1B model's
    2.5 GB take seconds, and loading reads them anyway) and remembered while no file is replaced
    or written to (same inode, size, mtime and ctime), so each checkpoint of a run does not read a
    large base again."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f == "config.json"
                 or f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json"))]
    else:
        files = [path]
    stats = [os.stat(f) for f in files]
    return _sha256(tuple((f, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for f, s in zip(files, stats)))


@lru_cache(maxsize=8)
def _sha256(files: tuple) -> str:
    h = hashlib.sha256()
    for path, *_ in files:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _attach_recorded(model: GPT, ckpt: dict) -> GPT:
    """`model` with fresh adapters of the shape a LoRA checkpoint records."""
    lora = ckpt["lora"]
    return attach_lora(model, lora["rank"], lora["alpha"], lora["targets"], lora["dropout"])


def prepare_trainable(model: GPT, cfg: TrainConfig) -> GPT:
    """Apply the memory settings to a model about to train, in place: gradient checkpointing,
    and with lora_rank LoRA adapters on a frozen base held in frozen_dtype."""
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.lora_rank:
        attach_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg), cfg.lora_dropout)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype(cfg))
    return model


def lora_targets(cfg: TrainConfig) -> list[str]:
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    return getattr(torch, cfg.frozen_dtype)


def lora_record(cfg: TrainConfig, base: str) -> dict:
    """What a LoRA checkpoint records to rebuild its model: the base, its fingerprint (checked
    when the adapters are loaded onto it) and the adapters' shape."""
    if not cfg.lora_rank:
        return {}
    return {"lora": dict(base=os.path.abspath(base), fingerprint=fingerprint(base), rank=cfg.lora_rank,
                         alpha=cfg.lora_alpha, targets=lora_targets(cfg), dropout=cfg.lora_dropout)}


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""whole tensors on the CPU, whether the model is sharded (FSDP) or not: one checkpoint format for
every --parallel and world size. Under FSDP the gather is collective and only rank 0 gets them."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: every weight, or only those that train when some are
    frozen (LoRA's adapters, and a reward model's head), since the rest is the base model.
    Collective under FSDP: every rank calls it."""
    state = get_model_state_dict(model, options=FULL)
    if all(p.requires_grad for p in model.parameters()):
        return state
    return {name: state[name] for name, p in model.named_parameters() if p.requires_grad and name in state}


def load_trainable(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load trainable_state's output into a model, sharded (FSDP) or not; every parameter that
    trains must be in it."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trained - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise DataError(f"{where}: the checkpoint does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); were the LoRA settings changed?")
    # a copy: the helper fills the dict it is given with the model's other weights
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))


def keyed_by_name(state: dict, model: torch.nn.Module, optimizer) -> dict:
    """An optimizer state dict keyed by parameter name, as checkpoints hold it; one keyed by
    position (optimizer.state_dict(), what checkpoints written before FSDP hold) is re-keyed by
    the names of the parameters in the optimizer's order."""
    if not state["param_groups"] or not all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        return state
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def _gather_rng(dist: Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states: the CPU generator's and, on a GPU, that device's (dropout, sampling)."""
    state = {"cpu": torch.get_rng_state()}
    if dist.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    if not dist.ddp:
        return [state]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, state)
    return states


def _metric_lines(path: str):
    """(line, row) for each line of metrics.jsonl up to the first that is not a whole JSON object:
    a kill or a full disk can leave half a last line, and the valid prefix is what the run logged."""
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return
            if not isinstance(row, dict):
                return
            yield line.rstrip("\n") + "\n", row


# The run folder's two guards: out_dir/.lock, held by the one process that writes the folder, and
# out_dir/.overwritten, the replaced run's config.json and metrics.jsonl, kept until the new run's
# first checkpoint replaces the old ckpt.pt (which stays in place and loadable until then).
LOCK, OVERWRITTEN, REPLACED_BY = ".lock", ".overwritten", "replaced_by"
_held: dict[str, tuple[int, bool]] = {}  # folders this process holds: real path -> (lock's descriptor, created here)


def _claim(path: str) -> str | None:
    """Lock path/.lock for this process; None, or why not in one line. flock is released by the
    kernel when the process ends, however it ends (kill -9 too), so a lock file that a killed run
    left is free to take: the file's text only tells a refused run who holds it. A run that ends
    removes the file, so the lock taken is checked to be on the file still there."""
    key = os.path.realpath(path)
    if key in _held:
        return None
    created = not os.path.isdir(path)
    lock = os.path.join(path, LOCK)
    while True:
        try:
            make_out_dir(path)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except DataError as e:
            return str(e)
        except OSError as e:
            return f"--out_dir {path}: cannot write there ({e.strerror})"
        if not fcntl:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return f"--out_dir {path} is in use by another run ({holder}); wait for it to end or choose another --out_dir"
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed this lock file as it ended, after we opened it: take a new one
    os.ftruncate(fd, 0)
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{command}\n".encode())
    _held[key] = (fd, created)
    return None


def lock_run_folder(path: str, dist: Dist) -> None:
    """Hold out_dir for this process's life (rank 0's lock stands for every rank): a second run on
    the folder is refused with one line naming the holder, before it reads or writes anything."""
    refused = _claim(path) if dist.master else None
    if dist.ddp:
        box = [refused]
        torch_dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise DataError(refused)


def restore_overwritten(path: str) -> bool:
    """Finish what an --overwrite left in path: if its new run never wrote a checkpoint (killed,
    crashed, bad input), the old run's config.json and metrics.jsonl go back beside its ckpt.pt,
    which was never touched; if it did, the old files go. True when the old run came back."""
    pending = os.path.join(path, OVERWRITTEN)
    if not os.path.isdir(pending):
        return False
    try:
        with open(os.path.join(pending, REPLACED_BY)) as f:
            token = f.read()
        committed = torch.load(os.path.join(path, "ckpt.pt"), map_location="cpu", weights_only=True,
                               mmap=True).get("replaces") == token
    except Exception:  # no token (killed while setting aside) or no readable checkpoint: nothing committed
        committed = False
    if not committed:
        for name in os.listdir(pending):
            if name != REPLACED_BY:
                os.replace(os.path.join(pending, name), os.path.join(path, name))
    shutil.rmtree(pending)
    return not committed


def release_run_folder(path: str) -> None:
    """At a run's end, however it ended: put back a run an unfinished --overwrite set aside,
    unlock and remove the lock file, and the folder if this process made it and wrote nothing
    there (bad input leaves nothing behind)."""
    key = os.path.realpath(path)
    if key not in _held:
        return
    if restore_overwritten(path):
        print(f"{path}: the run that --overwrite was replacing is restored (the new run wrote no checkpoint)",
              file=sys.stderr)
    fd, created = _held.pop(key)
    os.remove(os.path.join(path, LOCK))  # while still locked: a run that opened it meanwhile sees it gone
    if created and not os.listdir(path):
        os.rmdir(path)
    os.close(fd)


class Run:
    """An output directory: config.json, metrics.jsonl and ckpt.pt. Only rank 0 writes.

    A new run refuses a directory that already holds a checkpoint unless --overwrite is given, so
    a finished run is never clobbered by accident; --resume continues it instead: weights,
    optimizer, step and every rank's RNG state come back, and metrics logged after the
    checkpoint are dropped, so the resumed curve is the uninterrupted one. The folder is locked
    for the run's life, and a run that --overwrite replaces is kept until the new one's first
    checkpoint (see LOCK above)."""

    def __init__(self, cfg, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.dir = cfg.out_dir
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.replacing = None  # the token of the run set aside by --overwrite, until the first checkpoint
        lock_run_folder(self.dir, dist)
        if dist.master:
            if restore_overwritten(self.dir):
                print(f"{self.dir}: restored the run that an unfinished --overwrite had set aside", file=sys.stderr)
            for name in os.listdir(self.dir):  # replace_atomically's temporary files, left by a killed writer
                if re.fullmatch(r".+\.tmp\d+", name):
                    os.remove(os.path.join(self.dir, name))
        barrier(dist)  # the other ranks look at the folder as rank 0 left it
        if os.path.exists(self.ckpt_path) and not (cfg.resume or cfg.overwrite):
            raise DataError(f"--out_dir {self.dir} already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out_dir")
        if cfg.resume and not os.path.exists(self.ckpt_path):
            raise DataError(f"--resume but {self.ckpt_path} does not exist")
        self.resumed = load_checkpoint(self.ckpt_path) if cfg.resume else None

    def evaluates(self, step: int, start: int) -> bool:
        """Whether to evaluate and checkpoint at this step: at step 0, every early_eval_interval
        steps before early_eval_until, every eval_interval steps after, and at the end; not at the
        step a resumed run starts from, which was evaluated before its checkpoint."""
        cfg = self.cfg
        early = cfg.early_eval_interval > 0 and step < cfg.early_eval_until
        interval = cfg.early_eval_interval if early else cfg.eval_interval
        return (step % interval == 0 or step == cfg.max_iters) and not (self.resumed and step == start)

    def start(self, model: torch.nn.Module, optimizer, optimized: torch.nn.Module | None = None) -> int:
        """Create or restore the run; returns the step to start from. Call after all input has
        been read and validated, so that bad input leaves the directory untouched, and after
        wrap_model. `optimized` is the module whose parameters the optimizer steps, where that
        is more than `model` (PPO's policy and critic)."""
        if not self.cfg.resume:
            if self.dist.master:
                if os.path.exists(self.ckpt_path):  # --overwrite: set the old run aside, not away
                    self._set_aside()
                write_atomic(os.path.join(self.dir, "config.json"),
                             json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
                write_atomic(self.metrics_path, "")
            return 0
        ckpt = self.resumed  # kept: a script may restore more from it (PPO's critic)
        changed = {k: (v, getattr(self.cfg, k)) for k, v in ckpt["config"].items()
                   if k not in ("resume", "overwrite") and getattr(self.cfg, k, v) != v}
        if changed and self.dist.master:
            print(f"warning: resuming with changed settings (was, now): {changed}", file=sys.stderr)
        load_trainable(model, ckpt["model"], self.ckpt_path)
        if ckpt["optimizer"] is not None:
            optimized = optimized or model
            set_optimizer_state_dict(optimized, optimizer, keyed_by_name(ckpt["optimizer"], optimized, optimizer),
                                     options=StateDictOptions(full_state_dict=True))
        if len(ckpt["rng"]) == self.dist.world_size:
            state = ckpt["rng"][self.dist.rank]
            state = state if isinstance(state, dict) else {"cpu": state}  # older checkpoints: the CPU state alone
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.dist.device)
        elif self.dist.master:
            print("warning: world size changed since the checkpoint; RNG streams restart", file=sys.stderr)
        step = ckpt["step"]
        if self.dist.master:  # drop metrics logged after the checkpoint (a crash between saves)
            write_atomic(self.metrics_path, "".join(line for line, row in _metric_lines(self.metrics_path)
                                                    if row["step"] <= step))
            print(f"resuming {self.dir} from step {step}")
        return step

    def _set_aside(self) -> None:
        """Move the old run's config.json and metrics.jsonl into .overwritten, with a token that
        the new run's first checkpoint carries: until a ckpt.pt with that token exists, the old
        ckpt.pt is the folder's, and restore_overwritten puts the rest back."""
        pending = os.path.join(self.dir, OVERWRITTEN)
        os.makedirs(pending)
        self.replacing = uuid.uuid4().hex
        write_atomic(os.path.join(pending, REPLACED_BY), self.replacing)
        for name in ("config.json", "metrics.jsonl"):
            if os.path.exists(os.path.join(self.dir, name)):
                os.replace(os.path.join(self.dir, name), os.path.join(pending, name))

    def log(self, step: int, metrics: dict) -> None:
        """One line of metrics.jsonl."""
        if self.dist.master:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            except OSError as e:  # a full disk: a resume keeps the lines before a half-written one
                raise RunStopped(f"step {step}: writing {self.metrics_path} failed ({e.strerror or e})") from None

    def print(self, step: int, metrics: dict, samples: list[str] = ()) -> None:
        """An evaluation's metrics and a few samples on the console, above the progress bar."""
        if self.dist.master:
            from tqdm import tqdm
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {number(v)}" for k, v in metrics.items()))
            for line in samples:
                tqdm.write(f"  {line}")

    def save(self, step: int, model: GPT, optimizer, tokenizer: Tokenizer, extra: dict | None = None,
             optimized: torch.nn.Module | None = None) -> None:
        """Atomic (temporary file, then rename): an interrupted save leaves the last good one.
        Whole tensors, keyed by parameter name (the optimizer's state too), whatever --parallel
        and world size wrote them, so any of them resumes it."""
        rng = _gather_rng(self.dist)  # every rank takes part in the gathers
        local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        non_finite = float(sum(not bool(torch.isfinite(p).all()) for p in local))
        if self.dist.ddp:  # summed over ranks (under FSDP each holds its shards), so that all stop together
            non_finite = all_reduce_sum(torch.tensor(non_finite, device=self.dist.device), self.dist).item()
        if non_finite:
            raise NonFiniteLoss(f"step {step}: the model holds non-finite weights, so it is not saved")
        # a replica has nothing rank 0 lacks; under FSDP the gathers below are collective
        gathers = self.dist.master or self.dist.sharded
        model_state = trainable_state(model) if gathers else None  # whole tensors, on rank 0 only
        # none before the first step: the helper would make one with a dummy step, which advances
        # AdamW's step count and so changes its first real update
        optimizer_state = (get_optimizer_state_dict(optimized or model, optimizer, options=FULL)
                           if gathers and optimizer.state else None)
        failed = self.dist.master and self._write(step, {
            "model": model_state, "model_config": dataclasses.asdict(model.config),
            "optimizer": optimizer_state, "step": step, "rng": rng,
            "config": dataclasses.asdict(self.cfg), "tokenizer": tokenizer.state(), **(extra or {}),
        })
        if self.dist.ddp:  # every rank stops when rank 0 could not write
            box = [failed]
            torch_dist.broadcast_object_list(box, src=0)
            failed = box[0]
        if failed:
            raise RunStopped(failed)

    def _write(self, step: int, state: dict) -> str | None:
        """Write ckpt.pt; None, or why it failed (a full disk: the temporary file is gone and the
        last checkpoint stands). The first checkpoint of an --overwrite ends the old run."""
        if self.replacing:
            state["replaces"] = self.replacing
        try:
            replace_atomically(self.ckpt_path, lambda tmp: torch.save(state, tmp))
        except OSError as e:
            return f"step {step}: writing {self.ckpt_path} failed ({e.strerror or e})"
        if self.replacing:
            shutil.rmtree(os.path.join(self.dir, OVERWRITTEN))
            self.replacing = None
        return None


def number(v: float) -> str:
    """A metric on the console: integers whole, others to 4 decimals, or to 4 significant digits
    where 4 decimals would show nothing (a learning rate of 5e-7 prints 5e-07, not 0.0000)."""
    return str(v) if isinstance(v, int) else f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.4g}"


def interrupted(cfg, script: str, argv: list[str], dist: Dist) -> str:
    """What a run stopped by Ctrl-C says: where its last checkpoint is, and the command that
    continues it (checkpoints are written at evaluations; the steps since the last are redone)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.isdir(os.path.join(cfg.out_dir, OVERWRITTEN)):
        return f"interrupted before the first checkpoint; {cfg.out_dir} keeps the run --overwrite was replacing"
    if not os.path.exists(path):
        return f"interrupted before the first checkpoint; nothing in {cfg.out_dir} to resume"
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    launch = [f"torchrun --nproc_per_node {dist.world_size}" if dist.ddp else "python", os.path.basename(script)]
    flags, skip = [], False
    for a in argv:  # the same flags without --resume or --overwrite (and a value given after either)
        if skip and not a.startswith("--"):
            skip = False
            continue
        skip = a in ("--resume", "--overwrite")
        if not skip and a.split("=")[0] not in ("--resume", "--overwrite"):
            flags.append(a)
    return (f"interrupted: the last checkpoint is {path} (step {step}); continue with:\n"
            f"  {' '.join(launch + flags + ['--resume'])}")


def run_script(config_cls, train, argv, description: str) -> int:
    """Every train script's main: flags to config, torchrun setup, train(cfg, dist) -> metrics,
    a summary line, teardown. Bad input exits with status 2 and one line naming file, line and
    field; a non-finite loss exits with status 1 and names the step."""
    t0 = time.time()
    cfg = parse_config(config_cls, argv, description)
    dist = setup_distributed(cfg.device, cfg.parallel)
    metrics = None
    try:
        metrics = train(cfg, dist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        if dist.master:
            print(f"error: {e}; stopped, the last good checkpoint in {cfg.out_dir} is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if dist.master:
            script = sys.modules[train.__module__].__file__
            print(f"\n{interrupted(cfg, script, sys.argv[1:] if argv is None else argv, dist)}", file=sys.stderr)
        return 130  # the shell's status for a run stopped by Ctrl-C
    finally:
        release_run_folder(cfg.out_dir)
        cleanup_distributed(dist, finished=metrics is not None)
    if dist.master:
        print(f"done in {time.time() - t0:.0f}s: " + ", ".join(
            f"{k} {number(v)}" for k, v in metrics.items() if k.startswith(("eval/", "objective/"))))
    return 0


def progress_bar(total: int, initial: int, dist: Dist, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not dist.master, desc=desc, dynamic_ncols=True)
