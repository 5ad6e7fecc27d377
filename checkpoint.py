"""
Checkpoints and the run folder: reading a ckpt.pt (data, never code), rebuilding a policy or a
reward model from one or from a Hugging Face folder (LoRA adapters merged onto the base they
record), the trainable state and its optimizer state as whole tensors, and `Run`: the out dir
with its config, metrics log and checkpoint, resume, the lock held for a run's life and an
--overwrite that loses nothing. It holds no training loop, no algorithm and no process setup
(distributed.py). It imports reward_model.py for the RewardModel module alone, which a reward
model's checkpoint is checked against before it is built; that module imports model.py only.
"""
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
import uuid
from functools import lru_cache

import torch
import torch.distributed as torch_dist

from distributed import Dist, all_reduce_sum, barrier, is_dtensor, is_sharded
from files import DataError, make_out_dir, replace_atomically, write_atomic
from hf import (check_config, is_adapter_folder, is_toy_folder, is_reward_folder, load_adapter_folder, load_folder,
                load_reward_folder)
from lora import attach_lora, merge_lora
from model import GPT, GPTConfig
from reward_model import RewardModel, backbone_state
from tokenizer import Tokenizer
from trackers import Tracker, open_tracker

try:
    import fcntl
except ImportError:  # Windows has no flock: there a second run on one folder is not refused
    fcntl = None


def model_file(path: str) -> str:
    """Where a model flag's path is read from: a run folder given where a model is expected
    (`--sft_ckpt out/sft`) means its ckpt.pt, since a Hugging Face folder never holds one; any
    other path as given."""
    ckpt = os.path.join(path, "ckpt.pt")
    return ckpt if os.path.isdir(path) and os.path.isfile(ckpt) else path


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """A ckpt.pt as a dict of tensors and plain values. A checkpoint is data, never code:
    weights_only=True refuses anything else (unpickling another object could run code). A file
    that is not a checkpoint this project wrote is one DataError line. mmap=True reads a tensor's
    bytes only when they are used (to look at a checkpoint's record without loading its weights)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch fails on an empty, cut or foreign file in many ways (EOFError, RuntimeError, ...)
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:  # weights_only names the class it refused
            raise DataError(f"{path}: not a checkpoint this project wrote: it holds Python objects other than tensors "
                            f"({refused[1]}), which are never loaded, as loading them could run code") from None
        raise DataError(f"{path}: not a readable checkpoint (empty, truncated or not written by torch.save)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)  # what the loaders read
            and isinstance(ckpt.get("tokenizer"), (dict, bytes))
            and isinstance(ckpt.get("model_config") or ckpt.get("lora"), dict)):
        raise DataError(f"{path}: not a checkpoint this project wrote (no 'model', 'tokenizer' and 'model_config' "
                        "or 'lora' in it)")
    return ckpt


class RunStopped(RuntimeError):
    """A run that cannot go on; run_script reports it and exits with status 1, leaving the last
    checkpoint."""


class NonFiniteLoss(RunStopped):
    """A NaN or infinite loss, gradient norm or weight."""


def non_finite_weights(model: torch.nn.Module, dist: Dist) -> bool:
    """Whether any weight is NaN or infinite, on any rank: under FSDP each holds its shards, so
    the count is all-reduced and every rank stops together (DDP's replicas agree already)."""
    local = [p.to_local() if is_dtensor(p) else p for p in model.parameters()]
    count = torch.stack([~torch.isfinite(p).all() for p in local]).sum().float()
    if dist.sharded:
        count = all_reduce_sum(count, dist)
    return bool(count)


def check_finite(model: torch.nn.Module, path: str) -> None:
    """A loaded model's weights are numbers: NaN or infinite ones would reach the sampler (an
    IndexError far from the cause) or be exported as they are."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise DataError(f"{path}: the weight {name} holds NaN or infinite values")


def is_toy_model(path: str) -> bool:
    """Whether the model at `path` is the toy task's, by what it is, never by the path's shape:
    every stage's checkpoint records it (`toy_task`, passed down from the model the run started
    from), as export.py records it in a Hugging Face folder's config.json; a downloaded folder never
    is. A checkpoint written before that record is the toy model when its tokenizer is one this
    project trained."""
    path = model_file(path)
    if os.path.isdir(path):
        return is_toy_folder(path)
    ckpt = load_checkpoint(path, mmap=True)
    if "toy_task" in ckpt:
        return bool(ckpt["toy_task"])
    tok = ckpt["tokenizer"]
    return isinstance(tok, bytes) or (tok.get("kind") == "sentencepiece"
                                      and all(tok.get(k) == v for k, v in Tokenizer.TOY_IDS.items() if k != "unk_id"))


def load_gpt(path: str, dtype: torch.dtype | None = torch.float32,
             lora_base: str = "", merge: bool = True) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, from a ckpt.pt of any stage (or its run folder), a Hugging
    Face model folder or a PEFT adapter folder. Weights come in float32 by default, the master
    weights training needs (autocast does the bfloat16 compute); dtype=None keeps the stored one.
    A LoRA run's checkpoint holds adapters only: they are put on its base model and merged
    (merge=False leaves them on, for export.py --adapter); the base is the one it records, or
    `lora_base` where that base has moved. An adapter folder is its base, `lora_base` or the
    folder its adapter_config.json names, with the adapter merged."""
    path = model_file(path)
    if os.path.isdir(path):
        model, tok = (load_adapter_folder(path, dtype, lora_base) if is_adapter_folder(path)
                      else load_folder(path, dtype))
        check_finite(model, path)
        return model, tok
    ckpt = load_checkpoint(path)
    if "head.proj.weight" in ckpt["model"]:
        raise DataError(f"{path}: a reward model's checkpoint, not a language model's")
    if "lora" in ckpt:
        model = _attach_recorded(_lora_base(path, ckpt, lora_base), ckpt)
        load_trainable(model, ckpt["model"], path)
        if merge:
            merge_lora(model)
    else:
        model = _checkpointed(GPT, path, _model_config(path, ckpt), ckpt["model"])
    check_finite(model, path)
    return model.to(dtype), Tokenizer.from_state(ckpt["tokenizer"], path)


def _model_config(path: str, ckpt: dict) -> GPTConfig:
    """A checkpoint's model_config, every value checked before anything is built."""
    try:
        return check_config(ckpt["model_config"])
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


def is_reward_checkpoint(path: str) -> bool:
    """Whether a model flag's path holds a reward model: train_rm.py's checkpoint (a scalar head
    among its weights) or a sequence-classification folder. Reads no weights."""
    path = model_file(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json")) and is_reward_folder(path)
    return os.path.isfile(path) and "head.proj.weight" in load_checkpoint(path, mmap=True)["model"]


def load_reward_model(path: str, lora_base: str = "") -> tuple[RewardModel, Tokenizer]:
    """A reward model and its tokenizer from train_rm.py's ckpt.pt (LoRA adapters merged on the
    base it records, or on `lora_base` where that base has moved), or from a downloaded
    XForSequenceClassification folder (in float32, as the trainers' master weights)."""
    path = model_file(path)
    if os.path.isdir(path):
        model, tok = load_reward_folder(path, torch.float32)
        check_finite(model, path)
        return model, tok
    ckpt = load_checkpoint(path)
    if "lora" in ckpt:
        model = RewardModel.from_gpt(_lora_base(path, ckpt, lora_base))
        _attach_recorded(model.backbone, ckpt)  # the head trains and is in the checkpoint
        load_trainable(model, ckpt["model"], path)
        merge_lora(model)
    else:
        config = _model_config(path, ckpt)
        model = _checkpointed(RewardModel, path, config, backbone_state(ckpt["model"], config))
    check_finite(model, path)
    return model, Tokenizer.from_state(ckpt["tokenizer"], path)


def _lora_base(path: str, ckpt: dict, moved_to: str = "") -> GPT:
    """The base model of a LoRA checkpoint: `moved_to` (--lora_base) where it holds the files the
    adapters were trained on, else the base it records, refused unless its files are those: adapters
    merged onto other weights give a model no one trained. A base that is itself a LoRA checkpoint
    is looked for with `moved_to` too, so one --lora_base serves a chain (a LoRA reward model
    trained on a LoRA SFT model, both on the folder that moved)."""
    recorded = ckpt["lora"]["base"]
    found = [b for b in dict.fromkeys((moved_to, recorded)) if b and os.path.exists(b)]
    if not found:
        raise DataError(f"{path}: holds LoRA adapters of the base model {moved_to or recorded}, which does not exist "
                        "(give its new place with --lora_base)")
    expected = ckpt["lora"].get("fingerprint")
    if expected is None:
        base = found[0]
        print(f"warning: {path} records no fingerprint of its LoRA base; assuming {base} holds the weights "
              "its adapters were trained on", file=sys.stderr)
    else:
        base = next((b for b in found if fingerprint(b) == expected), None)
        if base is None:
            raise DataError(f"{path}: its LoRA adapters were trained on the base model at {recorded}, and {found[0]} "
                            "holds other weights (give the original's place with --lora_base)")
    return load_gpt(base, lora_base=moved_to)[0]


def fingerprint(path: str) -> str:
    """The sha256 of a model's files: a ckpt.pt, or a folder's config.json and safetensors weights.
    Files, not tensors: a training run holds its base in --frozen_dtype, sharded, adapters on,
    while the files are what the run and every later load read alike. Streamed (a 1B model's
    2.5 GB take seconds, and loading reads them anyway) and remembered while no file is replaced
    or written to (same inode, size, mtime and ctime), so each checkpoint of a run does not read a
    large base again. A run folder means its ckpt.pt, as everywhere a model is read (model_file)."""
    path = model_file(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))  # a model's, or a PEFT adapter's
                 if f in ("config.json", "adapter_config.json") or f.startswith(("model", "adapter_model"))
                 and f.endswith((".safetensors", ".safetensors.index.json"))]
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


# One checkpoint format for every --parallel and world size: whole tensors on the CPU, keyed by
# parameter name (the optimizer's state too). Under FSDP torch's state-dict helpers gather them,
# collectively, and only rank 0 gets them; they are imported there only, since they take about a
# second to import, which every unsharded process (and every test that starts one) would pay.


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: every weight, or only those that train when some are
    frozen (LoRA's adapters, and a reward model's head), since the rest is the base model.
    Collective under FSDP: every rank calls it."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=_full_options())
    else:
        state = {name: t.cpu() for name, t in model.state_dict().items()}
    if all(p.requires_grad for p in model.parameters()):
        return state
    return {name: state[name] for name, p in model.named_parameters() if p.requires_grad and name in state}


def load_trainable(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load trainable_state's output into a model, sharded (FSDP) or not; every parameter that
    trains must be in it, each a floating-point tensor of the parameter's shape."""
    if not isinstance(state, dict):
        raise DataError(f"{where}: the checkpoint holds no weights for this model")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = model.state_dict()  # under FSDP, DTensors whose shape is the whole tensor's
    missing, unexpected = sorted(trained - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DataError(f"{where}: the checkpoint does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); were the LoRA settings changed?")
    for name, tensor in state.items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.shape == expected[name].shape):
            raise DataError(f"{where}: {name} is not a floating-point tensor of shape {list(expected[name].shape)}, "
                            "the model's (a model of another size?)")
    if not is_sharded(model):
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    # a copy: the helper fills the dict it is given with the model's other weights
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state dict keyed by parameter name, whole tensors on the CPU. Collective
    under FSDP."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    state = optimizer.state_dict()
    on_cpu = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in state["state"].items()}
    return keyed_by_name({**state, "state": on_cpu}, model, optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, where: str) -> None:
    """Restore optimizer_state's output (or an older checkpoint's, keyed by position), every
    value checked first: torch copies moment tensors of the wrong shape without a check, and the
    fused step then writes out of bounds (a crash, not an error)."""
    state = keyed_by_name(_checked_optimizer_state(state, model, optimizer, where), model, optimizer)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, s in state["state"].items():
        if name not in shapes or not isinstance(s, dict):
            raise DataError(f"{where}: the optimizer state holds {name!r}, not a parameter of this model that trains")
        for key, value in s.items():
            ok = (torch.is_tensor(value) and value.is_floating_point()
                  and (value.shape == shapes[name] if key.startswith("exp_avg") else value.numel() == 1))
            if not ok:
                raise DataError(f"{where}: the optimizer state's {key} of {name} is not a floating-point tensor of "
                                f"shape {list(shapes[name]) if key.startswith('exp_avg') else []}")
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    groups = _group_names(model, optimizer)
    if [g["params"] for g in state["param_groups"]] != groups:
        raise DataError(f"{where}: the optimizer state does not fit the model's parameters")
    index = {name: i for i, name in enumerate(name for g in groups for name in g)}
    optimizer.load_state_dict({"state": {index[name]: s for name, s in state["state"].items()},
                               "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                                for g in state["param_groups"]]})


def _checked_optimizer_state(state, model: torch.nn.Module, optimizer, where: str) -> dict:
    """An optimizer state's layout: {'state': {...}, 'param_groups': [{'params': [...]}, ...]}
    with as many groups as the optimizer, keyed by this model's parameter names or by positions
    within its count."""
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(groups := state.get("param_groups"), list) and len(groups) == len(optimizer.param_groups)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise DataError(f"{where}: the optimizer state is damaged (not the layout an AdamW state dict has)")
    names = {name for name, _ in model.named_parameters()}
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    keys = [k for g in groups for k in g["params"]] + list(state["state"])
    if not all(k in names if isinstance(k, str) else isinstance(k, int) and 0 <= k < count for k in keys):
        raise DataError(f"{where}: the optimizer state does not fit the model's parameters")
    return state


def keyed_by_name(state: dict, model: torch.nn.Module, optimizer) -> dict:
    """An optimizer state dict keyed by parameter name, as checkpoints hold it; one keyed by
    position (optimizer.state_dict(), what checkpoints written before FSDP hold) is re-keyed by
    the names of the parameters in the optimizer's order."""
    if not state["param_groups"] or not all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        return state
    order = [name for group in _group_names(model, optimizer) for name in group]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def _group_names(model: torch.nn.Module, optimizer) -> list[list[str]]:
    """The names of each optimizer group's parameters, in the optimizer's order."""
    names = {p: name for name, p in model.named_parameters()}
    return [[names[p] for p in group["params"]] for group in optimizer.param_groups]


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


def _metric_lines(path: str) -> list[tuple[str, dict]]:
    """(line, row) for each line of metrics.jsonl. A kill or a full disk can leave half a last
    line, which is dropped; any other line that is not a JSON object with a step is damage that
    a resume would silently lose rows past, so it is refused, naming the line."""
    lines, rows = open(path, encoding="utf-8", errors="replace").read().splitlines(keepends=True), []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and type(row.get("step")) is int):
            if number == len(lines) and not line.endswith("\n"):
                break
            raise DataError(f"{path}, line {number}: not a metrics row (a JSON object with a step); "
                            "fix or remove the line, then resume")
        rows.append((line, row))
    return rows


def _script_name(cfg) -> str:
    """The script a config belongs to (train_sft.py, ...), by the module that defines it."""
    return os.path.basename(sys.modules[type(cfg).__module__].__file__)


def _made_by(ckpt: dict, cfg) -> str | None:
    """The script that wrote a checkpoint, as it records; for one written before that record,
    None where every setting it holds is one of this script's, else the settings that are not."""
    if "script" in ckpt:
        return ckpt["script"]
    foreign = sorted(set(ckpt["config"]) - {f.name for f in dataclasses.fields(cfg)})
    return f"another script (its settings include --{', --'.join(foreign[:3])})" if foreign else None


def check_resumable(ckpt: dict, path: str, cfg, counts: tuple[str, ...] = ()) -> None:
    """Everything of a checkpoint that --resume uses besides the weights and the optimizer state
    (checked against the model in Run.start), and the `counts` a script keeps in it: one
    DataError line naming the field, before any of it is used and before anything is written."""
    def damaged(field: str, why: str):
        raise DataError(f"{path}: '{field}' {why}; the checkpoint is damaged (resume from a copy, or --overwrite)")

    if not isinstance(ckpt.get("config"), dict):
        damaged("config", "is missing")
    script, made_by = _script_name(cfg), _made_by(ckpt, cfg)
    if made_by not in (None, script):
        raise DataError(f"--resume: {os.path.dirname(path) or '.'} holds a run of {made_by}, not of {script}; "
                        "a run folder belongs to the script that made it (give this run another --out_dir)")
    step = ckpt.get("step")
    if type(step) is not int or step < 0:
        damaged("step", f"is {step!r}, not a step number")
    check_steps_left(step, path, cfg)
    for key in counts:
        if type(ckpt.get(key)) is not int or ckpt[key] < 0:
            damaged(key, "is not a count")
    if ckpt.get("optimizer") is None and step > 0:  # None is the state before the first step only
        damaged("optimizer", f"is missing at step {step}")
    rng = ckpt.get("rng")
    if not (isinstance(rng, list) and rng and all(isinstance(r, dict) or torch.is_tensor(r) for r in rng)):
        damaged("rng", "is not a list of RNG states")
    mine = torch.get_rng_state()
    for state in rng:
        state = state if isinstance(state, dict) else {"cpu": state}  # older checkpoints: the CPU state alone
        try:  # set, then restored: torch's own check is the one that decides
            torch.set_rng_state(state["cpu"])
        except (KeyError, TypeError, RuntimeError):
            damaged("rng", "holds a state that is not a CPU generator's")
        finally:
            torch.set_rng_state(mine)
        cuda = state.get("cuda")
        if cuda is not None and not (torch.is_tensor(cuda) and cuda.dtype == torch.uint8):
            damaged("rng", "holds a CUDA state that is not a generator's")


def check_steps_left(step: int, path: str, cfg) -> None:
    """A resumed run at `step` ends at or after it; --max_iters not yet settled (it comes from --epochs
    once the data is read) is checked again by Run.start."""
    if cfg.max_iters is not None and step > cfg.max_iters:
        raise DataError(f"--max_iters {cfg.max_iters}: the run in {os.path.dirname(path) or '.'} is at step {step} "
                        f"already; give --max_iters {step} or more to continue it")


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
            return (f"--out_dir {path} is in use by another run ({holder}); wait for it to end or choose another "
                    "--out_dir")
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed this lock file as it ended, after we opened it: take a new one
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    _held[key] = (fd, created)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{command}\n".encode())
    except OSError as e:  # a full disk: no lock file left behind, nor a folder made for it
        release_run_folder(path)
        return f"--out_dir {path}: cannot write there ({e.strerror})"
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
    """An output directory: config.json, metrics.jsonl and ckpt.pt, and --report_to's tracker
    (trackers.py), which gets every metrics.jsonl row. Only rank 0 writes.

    A new run refuses a directory that already holds a checkpoint unless --overwrite is given, so
    a finished run is never clobbered by accident; --resume continues it instead: weights,
    optimizer, step and every rank's RNG state come back, and metrics logged after the
    checkpoint are dropped, so the resumed curve is the uninterrupted one. The folder is locked
    for the run's life, and a run that --overwrite replaces is kept until the new one's first
    checkpoint (see LOCK above). A resumed checkpoint is checked whole first (check_resumable;
    `counts` names the running totals a script keeps in it)."""

    def __init__(self, cfg, dist: Dist, counts: tuple[str, ...] = ()):
        self.cfg, self.dist = cfg, dist
        self.dir = cfg.out_dir
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.replacing = None  # the token of the run set aside by --overwrite, until the first checkpoint
        self.tracker = Tracker()  # --report_to's, opened by start
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
        self.resumed, self.metric_lines = None, []
        if cfg.resume:
            self.resumed = load_checkpoint(self.ckpt_path)
            check_resumable(self.resumed, self.ckpt_path, cfg, counts)
            if os.path.exists(self.metrics_path):
                self.metric_lines = [line.rstrip("\n") + "\n" for line, row in _metric_lines(self.metrics_path)
                                     if row["step"] <= self.resumed["step"]]  # drop rows logged after the checkpoint
            elif dist.master:
                print(f"warning: {self.metrics_path} is missing; the resumed run's log starts at step "
                      f"{self.resumed['step']}", file=sys.stderr)

    def evaluates(self, step: int) -> bool:
        """Whether to evaluate and checkpoint after this step: every early_eval_interval steps
        before early_eval_until, every eval_interval steps after, and at the end (step 0, the
        model a run starts from, is evaluated before the loop)."""
        cfg = self.cfg
        early = cfg.early_eval_interval > 0 and step < cfg.early_eval_until
        interval = cfg.early_eval_interval if early else cfg.eval_interval
        return step % interval == 0 or step == cfg.max_iters

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
            self._open_tracker(0)
            return 0
        ckpt = self.resumed  # kept: a script may restore more from it (PPO's critic)
        check_steps_left(ckpt["step"], self.ckpt_path, self.cfg)
        load_trainable(model, ckpt["model"], self.ckpt_path)
        if ckpt["optimizer"] is not None:
            load_optimizer_state(optimized or model, optimizer, ckpt["optimizer"], self.ckpt_path)
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
            write_atomic(self.metrics_path, "".join(self.metric_lines))
            overridden = getattr(self.cfg, "overridden", [])  # train_utils.settings_of_resumed_run
            print(f"resuming {self.dir} from step {step}" + (f" with {', '.join(overridden)}; its other settings "
                                                             "as they were" if overridden else ""))
        self._open_tracker(step)
        return step

    def _open_tracker(self, step: int) -> None:
        """--report_to's tracker, on rank 0, under the id the run's checkpoints keep (a resumed run
        continues its tracker run)."""
        self.tracker_id = (self.resumed or {}).get("tracker_id") or uuid.uuid4().hex[:8]
        if self.dist.master:
            self.tracker = open_tracker(getattr(self.cfg, "report_to", "none"), self.dir,
                                        dataclasses.asdict(self.cfg), step, self.tracker_id)

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
            self.tracker.log(step, metrics)

    def print(self, step: int, metrics: dict, samples: list[str] = ()) -> None:
        """An evaluation's metrics and a few samples on the console, above the progress bar."""
        if self.dist.master:
            from tqdm import tqdm
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {number(v)}" for k, v in metrics.items()))
            for line in samples:
                tqdm.write(f"  {line}")
            if samples:
                self.tracker.samples(step, list(samples))

    def save(self, step: int, model: GPT, optimizer, tokenizer: Tokenizer, extra: dict | None = None,
             optimized: torch.nn.Module | None = None) -> None:
        """Atomic (temporary file, then rename): an interrupted save leaves the last good one.
        Whole tensors, keyed by parameter name (the optimizer's state too), whatever --parallel
        and world size wrote them, so any of them resumes it."""
        rng = _gather_rng(self.dist)  # every rank takes part in the gathers
        if non_finite_weights(model, self.dist):
            raise NonFiniteLoss(f"step {step}: the model holds non-finite weights, so it is not saved")
        # a replica has nothing rank 0 lacks; under FSDP the gathers below are collective
        gathers = self.dist.master or self.dist.sharded
        model_state = trainable_state(model) if gathers else None  # whole tensors, on rank 0 only
        # none before the first step: the helper would make one with a dummy step, which advances
        # AdamW's step count and so changes its first real update
        optim_state = optimizer_state(optimized or model, optimizer) if gathers and optimizer.state else None
        failed = self.dist.master and self._write(step, {
            "model": model_state, "model_config": dataclasses.asdict(model.config),
            "optimizer": optim_state, "step": step, "rng": rng,
            "config": dataclasses.asdict(self.cfg), "script": _script_name(self.cfg), "tokenizer": tokenizer.state(),
            "tracker_id": self.tracker_id,
            **(extra or {}),
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
        except RuntimeError as e:  # torch's writer reports a failed write (a full disk) as a RuntimeError
            return (f"step {step}: writing {self.ckpt_path} failed (is the disk full? torch says: "
                    f"{str(e).splitlines()[0]})")
        if self.replacing:
            shutil.rmtree(os.path.join(self.dir, OVERWRITTEN))
            self.replacing = None
        return None


def number(v: float) -> str:
    """A metric on the console: integers whole, others to 4 decimals, or to 4 significant digits
    where 4 decimals would show nothing (a learning rate of 5e-7 prints 5e-07, not 0.0000)."""
    return str(v) if isinstance(v, int) else f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.4g}"
