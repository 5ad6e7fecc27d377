"""
What every training script shares: config dataclass to command line, torchrun/DDP setup, device
and dtype, seeding, the optimizer and its schedule, the data order, one optimizer step with
gradient accumulation, checkpoints, resume and metrics logging. Nothing here is specific to an
algorithm: each train_X.py supplies its loss.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, Tokenizer, load_preferences, take, tokenize_pairs, write_atomic
from model import GPT, GPTConfig, PRESETS

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
    print_samples: int = 3
    """samples printed at each evaluation"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    compile: bool = False
    """torch.compile the model"""
    seed: int = 1337
    """seeds the initialisation, the data order and the samples"""


@dataclass
class PairsConfig(TrainConfig):
    """TrainConfig plus the preference data that DPO and the reward model read."""
    sft_ckpt: str = "out/sft/ckpt.pt"
    """SFT checkpoint to start from (its tokenizer reads the pairs)"""
    train_file: str = "out/pairs/pairs_train.jsonl"
    """preference pairs (plain, HH-RLHF or UltraFeedback-binarized JSONL)"""
    val_file: str = "out/pairs/pairs_val.jsonl"
    """held-out preference pairs"""
    format: Literal["auto", "plain", "hh", "ultrafeedback"] = "auto"
    """record format; auto recognises it from the first record"""
    skip_bad: bool = False
    """skip invalid records (and report how many) instead of stopping at the first"""
    max_length: int = 64
    """longest sequence in tokens, prompt and response together; longer ones are truncated"""
    max_prompt_length: Optional[int] = None
    """longest prompt; a longer one keeps its last tokens. none: prompts are not truncated"""
    # optimisation defaults for the toy task's pairs
    batch_size: int = 64
    """pairs per optimizer step, over all processes and micro-batches"""
    max_iters: int = 300
    """optimizer steps (about two passes over the toy task's 9.5k training pairs)"""
    warmup_iters: int = 30
    """steps of linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    eval_interval: int = 50
    """steps between held-out evaluations and checkpoints"""


def load_pairs(cfg: PairsConfig, tok: Tokenizer):
    """Tokenised training pairs, held-out pairs (as read) and held-out tensors. Bad input raises
    DataError, before anything is written."""
    train = tokenize_pairs(load_preferences(cfg.train_file, cfg.format, cfg.skip_bad), tok,
                           cfg.max_length, cfg.max_prompt_length)
    val_pairs = load_preferences(cfg.val_file, cfg.format, cfg.skip_bad)
    return train, val_pairs, tokenize_pairs(val_pairs, tok, cfg.max_length, cfg.max_prompt_length)


# -----------------------------------------------------------------------------
# Distributed setup, device, dtype, seeds


@dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

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


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process.
    gloo on CPU, nccl on CUDA; each process takes the GPU of its local rank."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(True, rank, local_rank, world_size, device)


def cleanup_distributed(dist: Dist) -> None:
    if dist.ddp:
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


# -----------------------------------------------------------------------------
# One optimizer step


class NonFiniteLoss(RuntimeError):
    pass


def train_step(model, optimizer, batches: list, loss_fn, n_global: int, grad_clip: float,
               dist: Dist, ctx) -> dict[str, float]:
    """Forward and backward over this rank's micro-batches, then one optimizer step.

    loss_fn(model, batch) -> (loss_sum, {name: sum}) returns sums over the batch's loss terms
    (tokens for SFT, pairs for DPO), not means. Dividing by n_global, the number of terms in the
    whole global batch, makes the gradient the global mean, whatever the world size and number
    of micro-batches (DDP averages gradients over ranks, hence the factor world_size). Gradients
    are all-reduced once, on the last micro-batch: the others run under no_sync, entered before
    their forward pass. Returns the global means of the loss and metrics, and grad_norm; a
    non-finite loss raises NonFiniteLoss before the weights are touched."""
    sums = None
    for i, batch in enumerate(batches):
        sync = not dist.ddp or i == len(batches) - 1
        with nullcontext() if sync else model.no_sync():
            with ctx:
                loss_sum, metric_sums = loss_fn(model, batch)
            (loss_sum * (dist.world_size / n_global)).backward()
        values = torch.stack([loss_sum.detach().float(), *(v.detach().float() for v in metric_sums.values())])
        sums = values if sums is None else sums + values
    sums = all_reduce_sum(sums, dist) / n_global
    stats = dict(zip(["loss", *metric_sums], sums.tolist()))
    if not math.isfinite(stats["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {stats['loss']}")
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


# -----------------------------------------------------------------------------
# Models, checkpoints, resume, metrics


def wrap_model(model: torch.nn.Module, dist: Dist, compile: bool) -> torch.nn.Module:
    """Optionally compile, then wrap in DDP. Keep a reference to the raw module for saving."""
    if compile:
        model = torch.compile(model)
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return model


def build_gpt(preset: str, vocab_size: int, dropout: float) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab_size, dropout=dropout, **PRESETS[preset]))


def load_checkpoint(path: str) -> dict:
    """A checkpoint is data, never code: weights_only=True refuses anything but tensors and
    plain containers."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_gpt(path: str) -> tuple[GPT, Tokenizer, dict]:
    """The model, its tokenizer and the whole checkpoint, from a ckpt.pt of any stage."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, Tokenizer(ckpt["tokenizer"]), ckpt


def load_reward_model(path: str):
    """A reward model (RewardModel) and its tokenizer from train_rm.py's ckpt.pt."""
    from reward_model import RewardModel
    ckpt = load_checkpoint(path)
    model = RewardModel(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, Tokenizer(ckpt["tokenizer"])


def _gather_rng(dist: Dist) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if not dist.ddp:
        return [state]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, state)
    return states


class Run:
    """An output directory: config.json, metrics.jsonl and ckpt.pt. Only rank 0 writes.

    A new run refuses a directory that already holds a checkpoint unless --overwrite is given, so
    a finished run is never clobbered by accident; --resume continues it instead: weights,
    optimizer, step and every rank's RNG state come back, and metrics logged after the
    checkpoint are dropped, so the resumed curve is the uninterrupted one."""

    def __init__(self, cfg, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.dir = cfg.out_dir
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if os.path.exists(self.ckpt_path) and not (cfg.resume or cfg.overwrite):
            raise SystemExit(f"error: {self.dir} already holds a run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out_dir")
        if cfg.resume and not os.path.exists(self.ckpt_path):
            raise SystemExit(f"error: --resume but {self.ckpt_path} does not exist")
        self.resumed = load_checkpoint(self.ckpt_path) if cfg.resume else None

    def start(self, model: torch.nn.Module, optimizer) -> int:
        """Create or restore the run; returns the step to start from. Call after all input has
        been read and validated, so that bad input leaves the directory untouched."""
        if not self.cfg.resume:
            if self.dist.master:
                os.makedirs(self.dir, exist_ok=True)
                if os.path.exists(self.ckpt_path):  # --overwrite: the old run must not be resumed
                    os.remove(self.ckpt_path)
                write_atomic(os.path.join(self.dir, "config.json"),
                             json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
                write_atomic(self.metrics_path, "")
            return 0
        ckpt = self.resumed  # kept: a script may restore more from it (PPO's critic)
        changed = {k: (v, getattr(self.cfg, k)) for k, v in ckpt["config"].items()
                   if k not in ("resume", "overwrite") and getattr(self.cfg, k, v) != v}
        if changed and self.dist.master:
            print(f"warning: resuming with changed settings (was, now): {changed}", file=sys.stderr)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) == self.dist.world_size:
            torch.set_rng_state(ckpt["rng"][self.dist.rank])
        elif self.dist.master:
            print("warning: world size changed since the checkpoint; RNG streams restart", file=sys.stderr)
        step = ckpt["step"]
        if self.dist.master:  # drop metrics logged after the checkpoint (a crash between saves)
            with open(self.metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            write_atomic(self.metrics_path, "".join(kept))
            print(f"resuming {self.dir} from step {step}")
        return step

    def log(self, step: int, metrics: dict) -> None:
        if self.dist.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def save(self, step: int, model: GPT, optimizer, tokenizer: Tokenizer, extra: dict | None = None) -> None:
        """Atomic (temporary file, then rename): an interrupted save leaves the last good one."""
        rng = _gather_rng(self.dist)  # every rank takes part in the gather
        if not self.dist.master:
            return
        state = {
            "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
            "config": dataclasses.asdict(self.cfg), "tokenizer": tokenizer.model_proto, **(extra or {}),
        }
        tmp = f"{self.ckpt_path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)


def run_script(config_cls, train, argv, description: str) -> int:
    """Every train script's main: flags to config, torchrun setup, train(cfg, dist) -> metrics,
    a summary line, teardown. Bad input exits with status 2 and one line naming file, line and
    field."""
    t0 = time.time()
    cfg = parse_config(config_cls, argv, description)
    dist = setup_distributed(cfg.device)
    try:
        metrics = train(cfg, dist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(dist)
    if dist.master:
        print(f"done in {time.time() - t0:.0f}s: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("eval/", "objective/"))))
    return 0


def progress_bar(total: int, initial: int, dist: Dist, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not dist.master, desc=desc, dynamic_ncols=True)


def fit(cfg: TrainConfig, dist: Dist, run: Run, raw_model, optimizer, tok: Tokenizer,
        train_data: dict[str, torch.Tensor], loss_fn, n_terms, evaluate, desc: str) -> dict:
    """The training loop every script shares.

    loss_fn(model, batch) -> (loss_sum, {metric: sum}) as in train_step; n_terms(train_data,
    indices) counts the loss terms of a global batch; evaluate(model, ctx) -> (metrics, lines)
    runs the held-out evaluation and returns lines to print. Evaluates and checkpoints at step 0,
    every eval_interval steps and at the end. Returns the last logged metrics."""
    step = run.start(raw_model, optimizer)
    model = wrap_model(raw_model, dist, cfg.compile)
    ctx = autocast(dist.device, cfg.dtype)
    n_examples = len(next(iter(train_data.values())))
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    mask_keys = [k for k in train_data if k.endswith("attention_mask")]
    tokens_in = lambda idx: int(sum(train_data[k][idx].sum() for k in mask_keys))
    # real tokens trained on so far; the data order is a function of the step, so a resumed run recounts
    tokens = sum(tokens_in(global_batch(n_examples, cfg.batch_size, s, cfg.seed)) for s in range(step))
    bar = progress_bar(cfg.max_iters, step, dist, desc)

    def eval_and_save(step, metrics):
        eval_metrics, lines = evaluate(model, ctx)
        metrics.update(eval_metrics)
        run.log(step, metrics)
        run.save(step, raw_model, optimizer, tok)
        if dist.master:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            for line in lines:
                bar.write(f"  {line}")
        return metrics

    metrics = eval_and_save(0, {}) if step == 0 else {}
    while step < cfg.max_iters:
        # 1. this step's learning rate and global batch; this rank's micro-batches
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = global_batch(n_examples, cfg.batch_size, step, cfg.seed)
        batches = [{k: v.to(dist.device) for k, v in take(train_data, idx).items()}
                   for idx in micro_batches(indices, dist, cfg.grad_accum)]
        # 2. forward, backward and step; the gradient is the mean over the global batch's loss terms
        try:
            stats = train_step(model, optimizer, batches, loss_fn, n_terms(train_data, indices),
                               cfg.grad_clip, dist, ctx)
        except NonFiniteLoss as e:
            raise SystemExit(f"error: step {step + 1}: {e}; stopped, the last good checkpoint "
                             f"{run.ckpt_path} is kept") from None
        step += 1
        tokens += tokens_in(indices)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        # 3. log, evaluate, checkpoint
        metrics = {}
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            metrics = {**stats, "learning_rate": lr, "tokens": tokens}
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = eval_and_save(step, metrics)
        elif metrics:
            run.log(step, metrics)
    bar.close()
    return metrics
