"""
What every training loop shares, each piece with one obvious meaning: config dataclass to
command line, the settings checks, mixed precision, the optimizer and its schedule, the data
order, the gradient-sync context of a micro-batch, the guards around the optimizer step
(all-reduced means, the clipped gradient norm, finite weights), the memory settings, and the
scripts' main. It holds no loop and takes no loss as a closure: each train_X.py shows its own
loop, micro-batches, forward, loss, loss.backward() and optimizer.step(), and its loss lives in
dpo.py, ppo.py, reward_model.py or the script itself.
Processes and devices are in distributed.py, checkpoints and the run folder in checkpoint.py.
"""
import argparse
import ast
import dataclasses
import errno
import glob
import inspect
import json
import math
import os
import shlex
import signal
import sys
import textwrap
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import torch

from checkpoint import (OVERWRITTEN, NonFiniteLoss, RunStopped, fingerprint, is_toy_model, load_gpt, model_file,
                        non_finite_weights, number, release_run_folder)
from data import TOY_PAIRS
from distributed import Dist, all_reduce_sum, cleanup_distributed, is_dtensor, place_frozen, setup_distributed
from files import DataError
from lora import AdaptersOff, attach_lora
from model import GPT
from trackers import TRACKERS, check_tracker, close_trackers

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
    true), Literal choices, Optional[...] (the word none gives None) and tuple[X, ...] (the flag
    given once for each item)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints, docs = get_type_hints(cls), _field_docs(cls)
    repeated = set()
    for f in dataclasses.fields(cls):
        typ, optional = hints[f.name], False
        if get_origin(typ) is Union:  # Optional[X]
            typ, optional = next(a for a in get_args(typ) if a is not type(None)), True
        kwargs = dict(default=f.default, help=docs.get(f.name, "").replace("%", "%%"))
        if get_origin(typ) is tuple:  # --flag A --flag B
            typ = get_args(typ)[0]
            kwargs.update(action="append", default=None, type=typ, metavar=typ.__name__.upper())
            parser.add_argument(f"--{f.name}", **kwargs)
            repeated.add(f.name)
            continue
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
    # flags not on the command line keep NOT_GIVEN (argparse sets a default only where the namespace has
    # none), so that --resume can take those from the run's own settings (settings_of_resumed_run)
    given = argparse.Namespace(**{f.name: None if f.name in repeated else NOT_GIVEN for f in dataclasses.fields(cls)})
    values = vars(parser.parse_args(argv, namespace=given))
    cfg = cls(**{f.name: tuple(values[f.name] or ()) if f.name in repeated
                 else f.default if values[f.name] is NOT_GIVEN else values[f.name] for f in dataclasses.fields(cls)})
    cfg.flags_given = {k for k, v in values.items() if v is not NOT_GIVEN and v is not None or k in repeated and v}
    return cfg


NOT_GIVEN = object()


def _holds(value, hint) -> bool:
    """Whether a JSON value is one a field of type `hint` takes (a run's config.json, read back)."""
    if get_origin(hint) is Union:
        return any(_holds(value, h) for h in get_args(hint))
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if get_origin(hint) is tuple:
        return isinstance(value, list) and all(_holds(v, get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float)
    return type(value) is hint


# what a run's checkpoint holds the weights of: a resumed run cannot take other values
RUN_DEFINING = ("init_from", "sft_ckpt", "preset", "lora_rank", "lora_targets")


def settings_of_resumed_run(cfg) -> None:
    """--resume: every setting not given on the command line is the run's own, from out_dir/config.json,
    so `--out_dir X --resume` alone continues it. One given that differs from the run's overrides it,
    said in one line, except those that make the checkpoint another model's (RUN_DEFINING), refused.
    A damaged config.json is one line."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not (cfg.resume and os.path.isfile(path)):
        return  # no run there: Run says so
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.loads(f.read(1 << 20))
    except (UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    hints = get_type_hints(type(cfg))
    if isinstance(saved, dict) and set(saved) - set(hints):
        return  # another script's run: its checkpoint says whose (checkpoint.check_resumable)
    if not isinstance(saved, dict) or any(not _holds(v, hints[k]) for k, v in saved.items()):
        raise DataError(f"{path}: not a run's settings as this project writes them (damaged?); fix it, or resume "
                        "with every flag given")
    given = getattr(cfg, "flags_given", set(hints))  # a config built in code: every value is given
    changed = []
    for name, was in saved.items():
        was = tuple(was) if isinstance(was, list) else was
        if name in ("resume", "overwrite", "out_dir"):
            continue
        if name not in given:
            setattr(cfg, name, was)
        elif getattr(cfg, name) != was:
            if name in RUN_DEFINING:
                raise DataError(f"--{name} {getattr(cfg, name)}: the run in {cfg.out_dir} was started with --{name} "
                                f"{was}, which its checkpoint holds the weights of (leave the flag out to resume it)")
            changed.append(f"--{name} {getattr(cfg, name)} (was {was})")
    for steps, fraction in (("max_iters", "epochs"), ("warmup_iters", "warmup_ratio")):
        # the run settled the steps from the fraction, and config.json holds both: a fraction given now is
        # settled again; else the run's steps stand (both given is the settings check's to refuse)
        if fraction in given and steps not in given:
            setattr(cfg, steps, None)
        elif fraction not in given and getattr(cfg, steps) is not None:
            setattr(cfg, fraction, None)
    cfg.overridden = changed  # said by Run.start, once the run resumes


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
    max_iters: Optional[int] = None
    """optimizer steps; none: the script's default on the toy task, or --epochs 1 on your own model"""
    epochs: Optional[float] = None
    """passes over the training data (prompts, for PPO and online DPO), instead of --max_iters"""
    lr: Optional[float] = None
    """peak learning rate; none: the script's default for the toy task, or for your own model (printed)"""
    min_lr: Optional[float] = None
    """learning rate at the end of the cosine decay; none: lr / 10"""
    warmup_iters: Optional[int] = None
    """steps of linear warmup; none: the script's default on the toy task, else --warmup_ratio of the run"""
    warmup_ratio: Optional[float] = None
    """warmup as a fraction of the run's steps, instead of --warmup_iters; none: 0.1 on your own model"""
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
    """steps between evaluations before early_eval_until, where a run moves fastest (0: eval_interval
    throughout)"""
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
    """under torchrun: ddp keeps a whole copy of the model on every process; fsdp shards weights, gradients
    and optimizer state (FSDP2)"""
    seed: int = 1337
    """seeds the initialisation, the data order and the samples"""
    # memory
    grad_checkpoint: bool = False
    """recompute each block's activations in the backward pass instead of keeping them"""
    lora_rank: int = 0
    """train LoRA adapters of this rank instead of every weight (0: full fine-tuning); the checkpoint holds
    the adapters"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (lora_alpha / lora_rank) B A x"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input"""
    lora_targets: str = "all"
    """comma-separated projections that get adapters, by Llama's names (q_proj, ..., down_proj) or Phi-3's fused
    ones (qkv_proj, gate_up_proj); all: every projection, by its family's names"""
    lora_base: str = ""
    """where the base model of a LoRA checkpoint this run reads (the input model, PPO's reward model) now is,
    if it has moved (empty: the path each records)"""
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the weights that do not train (reference, reward model, LoRA's base); bfloat16 needs --dtype
    bfloat16"""
    # chat
    chat_template: str = "auto"
    """auto: the model's own template, or Zephyr's for conversation data when it has none; zephyr; none; or a
    Jinja file"""
    # tracking
    report_to: Literal[TRACKERS] = "none"
    """also send metrics.jsonl's rows, the settings and printed samples to this experiment tracker (an
    optional package: pip install tensorboard, trackio or wandb); see trackers.py"""


# -----------------------------------------------------------------------------
# Mixed precision


def autocast(device: torch.device, dtype: str):
    """bfloat16 runs matmuls under autocast with float32 master weights; float32 needs nothing."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# Optimizer, schedule, data order


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only; biases and
    LayerNorm gains are not decayed. Fused kernels on CUDA and on the CPU (one kernel over every
    parameter instead of a chain of foreach ops: 5x faster on the CPU at SmolLM2-135M's size)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


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
    finite, unset = math.isfinite, lambda value: value is None
    rules = [
        ("batch_size", cfg.batch_size >= 1, "must be at least 1"),
        ("grad_accum", cfg.grad_accum >= 1, "must be at least 1"),
        ("max_iters", unset(cfg.max_iters) or cfg.max_iters >= 0, "must be 0 or more"),
        ("epochs", unset(cfg.epochs) or (finite(cfg.epochs) and cfg.epochs > 0), "must be a finite number above 0"),
        ("lr", unset(cfg.lr) or (finite(cfg.lr) and cfg.lr > 0), "must be a finite number above 0"),
        ("min_lr", unset(cfg.min_lr) or (finite(cfg.min_lr) and 0 <= cfg.min_lr <= (cfg.lr or math.inf)),
         "must be a finite number from 0 to --lr"),
        ("warmup_iters", unset(cfg.warmup_iters) or cfg.warmup_iters >= 0, "must be 0 or more"),
        ("warmup_ratio", unset(cfg.warmup_ratio) or 0 <= cfg.warmup_ratio < 1, "must be in [0, 1)"),
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
    for a, b in (("max_iters", "epochs"), ("warmup_iters", "warmup_ratio")):
        if getattr(cfg, a) is not None and getattr(cfg, b) is not None:
            raise DataError(f"--{a} and --{b} say the same thing two ways: give one")
    if cfg.frozen_dtype == "bfloat16" and cfg.dtype != "bfloat16":
        raise DataError("--frozen_dtype bfloat16 needs --dtype bfloat16 (autocast mixes the two)")
    check_tracker(cfg.report_to)


def check_batches(n: int, what: str, cfg: TrainConfig, dist: Dist) -> None:
    """A global batch of batch_size examples out of n, split evenly over processes and micro-batches."""
    if cfg.batch_size > n:
        raise DataError(f"--batch_size {cfg.batch_size}: more than the {n} {what}")
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise DataError(f"--batch_size {cfg.batch_size}: not divisible by {dist.world_size} process(es) x "
                        f"--grad_accum {cfg.grad_accum}")


def toy_default(value: str, toy_path: str, flag: str, model_path: str, toy: bool) -> str:
    """A data flag's value: as given, or when empty the toy task's file, which a model other than
    the toy task's (`toy`: checkpoint.is_toy_model) must never read silently."""
    if value:
        return value
    if not toy:
        raise DataError(f"--{flag}: required with your own model ({model_path}); "
                        f"its default, {toy_path}, is the toy task's")
    return toy_path


def require_inputs(cfg, *flags: str) -> None:
    """Each named flag's file or folder exists; if not, one line naming the flag."""
    for flag in flags:
        path = getattr(cfg, flag)
        if path and not os.path.exists(path) and not glob.glob(path):  # a quoted pattern: Hub shards
            raise DataError(f"--{flag} {path}: no such file or folder")


def settle_pair_defaults(cfg, dist: Dist) -> None:
    """The derived settings of a DPO or reward-model run, settled before anything is read: the
    pair files are the toy task's only for the toy model given none, and the gold evaluation is
    on for the toy task."""
    require_inputs(cfg, "sft_ckpt")
    toy, user_data = is_toy_model(cfg.sft_ckpt), bool(cfg.train_file)
    cfg.train_file = toy_default(cfg.train_file, TOY_PAIRS[0], "train_file", cfg.sft_ckpt, toy)
    if not user_data and not cfg.val_file:
        cfg.val_file = TOY_PAIRS[1]
    judged = bool(getattr(cfg, "judge_ckpt", "") or getattr(cfg, "judge_fn", ()))  # DPO's judge; an RM has none
    resolve_gold_eval(cfg, toy and (not user_data or bool(getattr(cfg, "eval_prompts", ""))) and not judged, dist)


def check_pair_settings(cfg) -> None:
    """The inputs of a DPO or reward-model run, once settle_pair_defaults has settled them."""
    require_inputs(cfg, "sft_ckpt", "train_file", "val_file")
    for flag in ("max_length", "max_prompt_length"):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 2:
            raise DataError(f"--{flag} {getattr(cfg, flag)}: must be at least 2")


def settle_schedule(cfg: TrainConfig, toy: bool, toy_defaults: dict, own_lr: float) -> None:
    """The optimisation settings not given, before anything is read: on the toy task the script's
    own (`toy_defaults`: max_iters, lr, warmup_iters, tuned on it); on your own model `own_lr` (the
    papers' and TRL's for the method), one epoch and a warmup of a tenth of the run, as TRL's
    trainers and the Zephyr recipe run. min_lr is lr / 10 on both. Steps that depend on the data's
    size are settled by settle_steps once it is read."""
    if cfg.lr is None:
        cfg.lr = toy_defaults["lr"] if toy else own_lr
    if cfg.min_lr is None:
        cfg.min_lr = cfg.lr / 10
    if cfg.max_iters is None and cfg.epochs is None:
        if toy:
            cfg.max_iters = toy_defaults["max_iters"]
        else:
            cfg.epochs = 1.0
    if cfg.warmup_iters is None and cfg.warmup_ratio is None:
        if toy:
            cfg.warmup_iters = toy_defaults["warmup_iters"]
        else:
            cfg.warmup_ratio = 0.1
    if 0 < cfg.lr < cfg.min_lr:  # a bad --lr itself is the settings check's to name
        raise DataError(f"--min_lr {cfg.min_lr}: above this run's learning rate, {cfg.lr} (give --lr too)")


def settle_steps(cfg: TrainConfig, n: int, dist: Dist) -> None:
    """--epochs as steps, once the data is read: n is an epoch in the units of --batch_size (examples,
    pairs, prompts or responses), and an epoch's remainder is dropped (global_batch); then warmup
    from --warmup_ratio. Printed, with the data's size."""
    before = dataclasses.asdict(cfg)
    if cfg.max_iters is None:
        cfg.max_iters = max(1, int(cfg.epochs * n) // cfg.batch_size)
    if cfg.warmup_iters is None:
        cfg.warmup_iters = math.ceil(cfg.warmup_ratio * cfg.max_iters)
    print_settled(before, cfg, dist)


def print_settled(before: dict, cfg, dist: Dist) -> None:
    """The settings a script's settle_defaults chose, against `before` (dataclasses.asdict of the
    config as given), on one line: what the run uses without having been told."""
    chosen = [f"--{k} {v:.6g}" if type(v) is float else f"--{k} {v}"
              for k, v in dataclasses.asdict(cfg).items() if v != before[k]]
    if chosen and dist.master:
        print(f"settled: {', '.join(chosen)}")


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
# The pieces each loop puts around its own forward, loss.backward() and optimizer.step()


@contextmanager
def gradient_sync(model, dist: Dist, sync: bool):
    """One micro-batch's forward and backward with the gradient reduction over ranks on (`sync`:
    the step's last micro-batch) or off (the others), so gradients are reduced once a step.
    Under DDP the others run under no_sync, entered before their forward pass; under FSDP with
    gradient sync off, which keeps each micro-batch's unsharded gradients for the last one to
    reduce-scatter. One process has nothing to reduce."""
    sync = sync or not dist.ddp
    if dist.sharded:
        from torch.distributed.fsdp import FSDPModule  # imported by distributed.shard already
        for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
            unit.set_requires_gradient_sync(sync, recurse=False)
    with nullcontext() if sync or dist.sharded else model.no_sync():
        yield


def add_sums(sums: dict, loss_sum: torch.Tensor, metric_sums: dict) -> dict:
    """Running totals, by name, of a loss and its metrics summed over a batch's terms (tokens for
    SFT, pairs for DPO), detached: a step's over its micro-batches, or a held-out set's."""
    return {name: sums.get(name, 0) + value.detach().float()
            for name, value in {"loss": loss_sum, **metric_sums}.items()}


def all_reduce_sums(sums: dict, dist: Dist) -> dict[str, float]:
    """The totals of add_sums summed over every rank."""
    return dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values())), dist).tolist()))


def batch_means(sums: dict, n_global: int, dist: Dist, step: int) -> dict[str, float]:
    """A step's loss and metric sums (add_sums) all-reduced over ranks and divided by n_global,
    the number of loss terms in the whole global batch. A non-finite loss stops the run
    (NonFiniteLoss) before the optimizer steps on it."""
    means = all_reduce_sum(torch.stack(list(sums.values())), dist) / n_global
    stats = dict(zip(sums, means.tolist()))
    if not math.isfinite(stats["loss"]):
        raise NonFiniteLoss(f"step {step}: loss is {stats['loss']}")
    return stats


def clip_grad_norm(model, grad_clip: float, step: int) -> float:
    """Clip the global gradient norm to grad_clip (under FSDP the norm over every rank's shards);
    returns the norm before clipping. A finite loss can still overflow a gradient: a non-finite
    norm stops the run before the optimizer steps on it."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = (norm.full_tensor() if is_dtensor(norm) else norm).item()
    if not math.isfinite(norm):
        raise NonFiniteLoss(f"step {step}: gradient norm is {norm}")
    return norm


def check_weights(model, dist: Dist, step: int) -> None:
    """After the optimizer step: a learning rate too high for finite weights (--lr 1e39) stops
    the run at the step that did it."""
    if non_finite_weights(model, dist):
        raise NonFiniteLoss(f"step {step}: the update made weights NaN or infinite (is --lr too high?)")


# -----------------------------------------------------------------------------
# Memory settings and LoRA


def prepare_trainable(model: GPT, cfg: TrainConfig) -> GPT:
    """Apply the memory settings to a model about to train, in place: gradient checkpointing,
    and with lora_rank LoRA adapters on a frozen base held in frozen_dtype."""
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.lora_rank:
        try:
            attach_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg), cfg.lora_dropout)
        except ValueError as e:  # an unknown or overlapping target
            raise DataError(f"--lora_targets {cfg.lora_targets}: {e}") from None
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype(cfg))
    return model


def lora_targets(cfg: TrainConfig) -> list[str]:
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    return getattr(torch, cfg.frozen_dtype)


def frozen_reference(cfg: TrainConfig, policy: GPT, dist: Dist):
    """The frozen reference of DPO and RLHF, the SFT model the policy starts from: under LoRA the
    policy with its adapters off (no second copy), else a frozen copy of cfg.sft_ckpt, placed
    (under FSDP sharded)."""
    if cfg.lora_rank:
        return AdaptersOff(policy)
    return place_frozen(load_gpt(cfg.sft_ckpt, frozen_dtype(cfg), cfg.lora_base)[0], dist, cfg.dtype)


def lora_record(cfg: TrainConfig, base: str) -> dict:
    """What a LoRA checkpoint records to rebuild its model: the base, its fingerprint (checked
    when the adapters are loaded onto it) and the adapters' shape."""
    if not cfg.lora_rank:
        return {}
    base = model_file(base)
    return {"lora": dict(base=os.path.abspath(base), fingerprint=fingerprint(base), rank=cfg.lora_rank,
                         alpha=cfg.lora_alpha, targets=lora_targets(cfg), dropout=cfg.lora_dropout)}


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what a scheduler sends on preemption, a closed terminal), raised in the
    main thread where the run is, so it stops as Ctrl-C stops it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    for name in STOP_SIGNALS:  # once: a second signal does not cut the report and the cleanup short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


STOP_SIGNALS = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]  # Windows has no SIGHUP


def stopped(cfg, script: str, dist: Dist, what: str, resumable: bool = True) -> str:
    """What a run that stops before its end says (`what`: interrupted, stopped by SIGTERM, or a
    RunStopped error): where its last checkpoint is and, when `resumable`, the command that
    continues it (checkpoints are written at evaluations; the steps since the last are redone)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.isdir(os.path.join(cfg.out_dir, OVERWRITTEN)):
        return f"{what}; stopped before the first checkpoint, and {cfg.out_dir} keeps the run --overwrite was replacing"
    if not os.path.exists(path):
        return f"{what}; stopped before the first checkpoint, so nothing in {cfg.out_dir} to resume"
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    if not resumable:
        return f"{what}; stopped, the last good checkpoint is {path} (step {step})"
    launch = [f"torchrun --nproc_per_node {dist.world_size}" if dist.ddp else "python", os.path.basename(script)]
    # a resumed run takes its settings from its config.json (settings_of_resumed_run)
    return (f"{what}: the last checkpoint is {path} (step {step}); continue with:\n"
            f"  {' '.join(launch + ['--out_dir', shlex.quote(cfg.out_dir), '--resume'])}")


def run_script(config_cls, train, argv, description: str) -> int:
    """Every train script's main: flags to config, torchrun setup, train(cfg, dist) -> metrics,
    a summary line, teardown. Bad input exits with status 2 and one line naming file, line and
    field; a non-finite loss or a failed write with status 1; Ctrl-C, SIGTERM and SIGHUP with the
    shell's status for the signal (128 + its number). Each of these says where the last
    checkpoint is and how to resume, and leaves the folder unlocked."""
    t0 = time.time()
    cfg = parse_config(config_cls, argv, description)
    argv = sys.argv[1:] if argv is None else argv
    script = sys.modules[train.__module__].__file__
    handlers = {s: signal.signal(getattr(signal, s), _raise_terminated) for s in STOP_SIGNALS}
    dist = setup_distributed(cfg.device, cfg.parallel)
    metrics, status = None, 0
    try:
        settings_of_resumed_run(cfg)
        metrics = train(cfg, dist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except (RunStopped, FloatingPointError) as e:  # the latter: a diverged model's sampling
        if dist.master:  # on a line of its own below the progress bar
            print(f"\nerror: {stopped(cfg, script, dist, str(e), resumable=False)}", file=sys.stderr)
        status = 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        if dist.master:  # a full disk wherever a write failed: the writes are atomic, the last checkpoint stands
            print(f"\nerror: {stopped(cfg, script, dist, f'writing {e.filename} failed ({e.strerror})', False)}",
                  file=sys.stderr)
        status = 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        if dist.master:
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(f"\n{stopped(cfg, script, dist, what)}", file=sys.stderr)
        status = 128 + signum  # the shell's status for a process a signal ended
    finally:
        for s in handlers:  # nor a signal that comes as the run ends
            signal.signal(getattr(signal, s), signal.SIG_IGN)
        close_trackers()
        release_run_folder(cfg.out_dir)
        cleanup_distributed(dist, finished=metrics is not None)
        for s, handler in handlers.items():
            signal.signal(getattr(signal, s), handler)
    if status == 0 and dist.master:
        print(f"done in {time.time() - t0:.0f}s: " + ", ".join(
            f"{k} {number(v)}" for k, v in metrics.items() if k.startswith(("eval/", "objective/"))))
    return status


def progress_bar(total: int, initial: int, dist: Dist, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not dist.master, desc=desc, dynamic_ncols=True)
