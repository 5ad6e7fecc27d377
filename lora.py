"""
LoRA (Hu et al. 2021): freeze a model's weights and train a low-rank update of chosen
projections, W x + (alpha / r) B A x with A (r, in) and B (out, r). B starts at zero, so a fresh
adapter leaves the model exactly as it was. Switching the adapters off gives back the frozen
model itself: DPO's and PPO's reference at no memory cost. Merging folds B A into W for export.

Targets are named as in Llama (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj),
and as Phi-3 stores its fused ones (qkv_proj, gate_up_proj); "all" is every projection under its
family's names. model.py fuses q/k/v into one matmul (c_attn) and gate/up into another (c_fc);
each targeted slice of a fused projection gets its own A and B, so an adapter here is the same
function as PEFT's adapter on the projection of that name. On GPT-2 blocks the MLP's input
projection is up_proj and there is no gate_proj.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's projections


def family_targets(model: GPT) -> tuple[str, ...]:
    """Every projection of the model, named as its family's checkpoints name them (what "all" adapts)."""
    return FUSED_TARGETS if model.config.family == "phi3" else TARGETS


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias keep their names, so checkpoints of the base model load
    unchanged) plus one adapter per output slice: rows start:end of the output gain
    scaling * B_s A_s x."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float,
                 dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.slices, self.scaling, self.enabled = slices, alpha / rank, True
        self.lora_dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, self.in_features, device=device))
                                        for _ in slices])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(end - start, rank, device=device))
                                        for start, end in slices])
        for A in self.lora_A:  # PEFT's initialisation: A as nn.Linear's default, B zero
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.enabled:
            return y
        h = self.lora_dropout(x)
        for (start, end), A, B in zip(self.slices, self.lora_A, self.lora_B):
            # in place: the linear's backward does not need its output, and no copy of y is made
            y[..., start:end] += F.linear(F.linear(h, A), B) * self.scaling
        return y

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the adapters: W[s] + scaling * B_s A_s."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight = self.weight.float().clone()
            for (start, end), A, B in zip(self.slices, self.lora_A, self.lora_B):
                weight[start:end] += self.scaling * (B.float() @ A.float())
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _target_slices(model: GPT, targets: list[str]) -> dict[str, list[tuple[int, int]]]:
    """Per projection name inside a block (attn.c_attn, ...), the output slices to adapt."""
    c = model.config
    q, kv, w = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    where = {"q_proj": ("attn.c_attn", (0, q)), "k_proj": ("attn.c_attn", (q, q + kv)),
             "v_proj": ("attn.c_attn", (q + kv, q + 2 * kv)), "qkv_proj": ("attn.c_attn", (0, q + 2 * kv)),
             "o_proj": ("attn.c_proj", (0, c.n_embd)), "down_proj": ("mlp.c_proj", (0, c.n_embd))}
    if c.mlp in ("swiglu", "geglu"):  # c_fc is [gate; up]
        where.update(gate_proj=("mlp.c_fc", (0, w)), up_proj=("mlp.c_fc", (w, 2 * w)),
                     gate_up_proj=("mlp.c_fc", (0, 2 * w)))
    else:
        where.update(up_proj=("mlp.c_fc", (0, w)))
    if targets == ["all"]:
        targets = list(family_targets(model))
    slices = {}
    for name in targets:
        if name not in (*TARGETS, *FUSED_TARGETS):
            raise ValueError(f"unknown LoRA target {name!r}; choose from all, {', '.join(TARGETS)}, qkv_proj, "
                             "gate_up_proj")
        if name in where:  # gate_proj on a GELU MLP: nothing to adapt
            module, piece = where[name]
            slices.setdefault(module, []).append(piece)
    for module, pieces in slices.items():
        pieces.sort()
        if any(a[1] > b[0] for a, b in zip(pieces, pieces[1:])):
            raise ValueError(f"two targets adapt part of {module} (qkv_proj holds q_proj, k_proj and v_proj; "
                             "gate_up_proj holds gate_proj and up_proj)")
    return slices


def attach_lora(model: GPT, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> GPT:
    """Freeze every weight of `model` and put adapters on `targets` in every block, in place.
    Returns the model; only its adapters have requires_grad."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for path, slices in _target_slices(model, targets).items():
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), slices, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: the model becomes a plain one again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


@contextmanager
def adapters_off(model: nn.Module):
    """The frozen base model inside: every adapter off and dropout off; both restored after."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    was_training = model.training
    for m in layers:
        m.enabled = False
    model.eval()
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        model.train(was_training)


class AdaptersOff(nn.Module):
    """The reference model of a LoRA policy: the policy's own weights with its adapters off.
    Called like the model it wraps (forward and generate), so DPO, PPO and the evaluation use it
    as they use a frozen copy, and no second copy of the weights is held."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model.generate(*args, **kwargs)
