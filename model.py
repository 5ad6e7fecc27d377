"""
One decoder-only transformer, configured to be any of the families this project loads: the toy
GPT (pre-LayerNorm blocks, learned positions, GELU, tied embeddings, GPT-2 initialisation),
GPT-2 itself, and the Llama family (Llama, Mistral, Qwen2, SmolLM, TinyLlama: RMSNorm, rotary
positions, SwiGLU, grouped-query attention). Attention goes through
scaled_dot_product_attention. The forward pass is padding-aware (positions come from the
attention mask and pad tokens are never attended to), so a sequence's logits do not depend on
how it is padded or batched. `generate` samples with a preallocated KV cache.

Beside the model, the batch layouts every algorithm shares (left-padded prompts, a pair batch
as chosen then rejected rows, IGNORE_INDEX labels) and `token_logps`, the one next-token
log-prob function of every loss and estimate. It imports nothing of the project: no training,
no data files, no file formats (hf.py reads folders, checkpoint.py checkpoints).
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in torch's cross_entropy

# Upper bounds on a configuration's sizes, far above any published model's (Llama-3.1-405B: 126
# layers, n_embd 16384, 128256 tokens; Qwen2.5-1M: 1010000 positions): a checkpoint or config.json
# is untrusted data, and a size no model has is refused before anything is built from it
MAX_SIZE = dict(vocab_size=2**24, block_size=2**22, n_layer=1024, n_head=2**12, n_kv_head=2**12, n_embd=2**16,
                head_dim=2**12, intermediate_size=2**18)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 128  # longest sequence, prompt and completion together
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in every Linear and LayerNorm layer (GPT-2)
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # MLP width; None: 4 * n_embd
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu", "gelu_tanh" (GPT-2's approximation) or "swiglu" (Llama)
    pos: str = "learned"  # "learned" (a position embedding table) or "rope" (rotary)
    rope_theta: float = 10000.0  # rotary base frequency
    qkv_bias: bool = False  # biases on the query, key and value projections alone (Qwen2)
    tie_embeddings: bool = True  # the output head shares the token embedding's weights

    def __post_init__(self):
        # a message naming the field for what would otherwise crash later, or build without bound
        for name, top in MAX_SIZE.items():
            value = getattr(self, name)
            if not (value is None and name in ("n_kv_head", "head_dim", "intermediate_size")
                    or is_int(value) and 1 <= value <= top):
                raise ValueError(f"{name} must be an integer from 1 to {top}, got {value!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}) unless head_dim is given")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            if not (is_real(getattr(self, name)) and 0 < getattr(self, name) < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        if not (is_real(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number from 0 to below 1, got {self.dropout!r}")
        for name in ("bias", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, choices in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "gelu_tanh", "swiglu")),
                              ("pos", ("learned", "rope"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


# Named sizes. Parameter counts are for a 512-piece vocabulary (the toy task's tokenizer);
# "gpt2" is GPT-2 small's shape, 124M parameters with GPT-2's own 50257-token vocabulary.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),     # 0.85M, CPU default
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),    # 10.8M, laptop GPU
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=512),   # 25.4M, laptop GPU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 85.3M here
}


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions; n_kv_head heads, so
    grouped-query attention caches n_head / n_kv_head times less."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int):
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = self.v = None  # allocated at the first update, in the activations' dtype (autocast)
        self.length = 0  # positions filled, the same for every sequence (prompts are left-padded)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new (B, n_kv, T, hs) keys and values; return all of them so far."""
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): rescale, no mean subtraction, no bias.
    Normalised in float32 and cast back before the weight, as the Llama reference code does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)  # Ba et al. 2016


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (Su et al. 2021, RoFormer eq. 34) angles pos * theta^(-2i/d) for positions
    (B, T), as cos and sin of shape (B, 1, T, head_dim), in float32 then cast to `dtype`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos[..., None].float() * inv_freq  # (B, T, hs/2)
    # Hugging Face's half layout: frequency i rotates dims i and i + hs/2 (not 2i and 2i+1, as in
    # the paper), so checkpoints converted for transformers load with no permutation of q and k
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        # query, key and value projections in one matmul; loaders concatenate separate q/k/v weights
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, rope, kv_cache, layer):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, n_kv, T_past + T, hs)
        # grouped-query attention (Ainslie et al. 2023): query head h reads key/value head
        # h // (n_head / n_kv_head)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.intermediate_size
        # SwiGLU (Shazeer 2020, eq. 6) has two input projections, gate and up: one matmul here
        n_in = 2 * width if self.kind == "swiglu" else width
        self.c_fc = nn.Linear(config.n_embd, n_in, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:  # GELU (Hendrycks & Gimpel 2016); GPT-2 uses its tanh approximation
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block (GPT-2, Radford et al. 2019): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, rope, kv_cache, layer):
        x = x + self.attn(self.ln_1(x), attn_mask, rope, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists to (B, P) ids and mask, padded on the left so that every prompt ends in
    the last column and the next token of every row goes in the same column."""
    P = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        attention_mask[i, P - len(p):] = 1
    return input_ids, attention_mask


def concatenate_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of B pairs as 2B rows, chosen first: input_ids, attention_mask and labels, each
    (2B, T). DPO and the reward model run chosen and rejected through one forward pass."""
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                 for k in ("input_ids", "attention_mask", "labels"))


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True where query t may attend key s: s is not after t and
    s is a real token. A pad query also attends itself, so no softmax row is empty (NaN); its
    output is garbage that no loss or sample ever reads. None when plain causal attention does."""
    if attention_mask is None and past == 0:
        return None  # lets SDPA take its is_causal fast path
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    allowed = key_pos <= query_pos  # (T, S)
    if attention_mask is None:
        return allowed[None, None]
    allowed = (allowed[None] & attention_mask[:, None, :].bool()) | (key_pos == query_pos)  # (B, T, S)
    return allowed[:, None]


class Packing:
    """Where the real tokens of a padded batch (B, T) go when packed into fewer rows of the same
    width T, each packed row holding whole sequences one after another (first-fit decreasing by
    length). A token keeps its position, the number of real tokens before it in its own row,
    and attends only to its own sequence's earlier tokens, so the hidden states of real tokens
    are the padded batch's, up to rounding, while pads cost no compute. Ragged batches of short
    completions (PPO's rollouts, SFT and DPO batches) are a third to a half padding."""

    def __init__(self, attention_mask: torch.Tensor, row_of: list[int], start_of: list[int], shape: tuple[int, int]):
        real = attention_mask.bool()
        self.batch_shape, self.shape = tuple(real.shape), shape
        self.source = real.nonzero(as_tuple=True)  # (row, column) of every real token in the padded batch
        positions = real.long().cumsum(1) - 1  # (B, T)
        sequence, device = self.source[0], real.device
        self.target = (torch.tensor(row_of, device=device)[sequence],
                       torch.tensor(start_of, device=device)[sequence] + positions[self.source])  # and in the packed rows
        self.positions = self.pack(positions)  # (R, W)
        segments = self.pack(torch.arange(1, len(real) + 1, device=device)[:, None].expand_as(positions))  # 0: a pad
        causal = torch.ones(shape[1], shape[1], dtype=torch.bool, device=device).tril()
        # a token attends its own sequence; trailing pads (segment 0) attend each other, so no
        # softmax row is empty, and their output is garbage that nothing reads
        self.attn_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # (R, 1, W, W)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "Packing | None":
        """The packing of a padded batch, or None when it would not save a row."""
        B, T = attention_mask.shape
        lengths = attention_mask.bool().sum(1).tolist()
        fill, row_of, start_of = [], [0] * B, [0] * B  # tokens used in each packed row; each sequence's row and start
        for b in sorted(range(B), key=lambda b: -lengths[b]):
            r = next((r for r, used in enumerate(fill) if used + lengths[b] <= T), len(fill))
            if r == len(fill):
                fill.append(0)
            row_of[b], start_of[b] = r, fill[r]
            fill[r] += lengths[b]
        return cls(attention_mask, row_of, start_of, (len(fill), max(max(fill), 1))) if len(fill) < B else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) in the padded layout to (R, W, ...), the real tokens only."""
        out = x.new_zeros(self.shape + x.shape[2:])
        out[self.target] = x[self.source]
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) back to (B, T, ...), zero at the pads; differentiable."""
        out = x.new_zeros(self.batch_shape + x.shape[2:])
        out[self.source] = x[self.target]
        return out


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":  # registered in this order, so a seed gives the toy GPT its old initial weights
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.grad_checkpoint = False  # recompute each block's activations in the backward pass
        self.packing = True  # run a padded batch without a KV cache as Packing's fewer rows (not when compiled)
        self.tie_weights()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self):
        """Share the token embedding with the output head (Press & Wolf 2017), where configured;
        again after loading weights by assignment, which replaces the parameters."""
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

    @classmethod
    def from_preset(cls, preset: str, vocab_size: int, dropout: float = 0.0) -> "GPT":
        """A new model of a named size (PRESETS) for a tokenizer's vocabulary."""
        return cls(GPTConfig(vocab_size=vocab_size, dropout=dropout, **PRESETS[preset]))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (a tied embedding once); by default without the tables that do no matmul:
        the position embedding, and the token embedding when the head does not share it."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token: 6 per parameter plus attention's
        12 * n_layer * (n_head * head_dim) * seq_len (PaLM paper, appendix B). A forward pass is a third."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def hidden_states(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None):
        """Final-norm hidden states, (B, T, C). `attention_mask` (B, T_past + T) covers any
        cached tokens too; 1 marks real tokens, 0 padding (on either side)."""
        B, T = input_ids.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if attention_mask is not None and past == 0 and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, SDPA's is_causal fast path
        # not under torch.compile: a packed batch's row count varies with its lengths, and each
        # new one would be compiled anew
        packable = self.packing and attention_mask is not None and kv_cache is None and not torch.compiler.is_compiling()
        packing = Packing.of(attention_mask) if packable else None
        if packing is not None:
            input_ids, pos, mask = packing.pack(input_ids), packing.positions, packing.attn_mask  # (R, W) rows
        else:
            if attention_mask is None:
                pos = torch.arange(past, past + T, device=input_ids.device)[None]  # (1, T)
            else:  # a token's position is the number of real tokens before it, whatever the padding
                pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
            mask = attention_mask_4d(attention_mask, past, T, input_ids.device)
        x = self.transformer.wte(input_ids)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.transformer.drop(x)
        # gradient checkpointing (Chen et al. 2016) keeps only each block's input for the backward
        # pass and runs the block again there: memory of one block's activations, a third more compute.
        # The recomputation replays the same dropout masks (the RNG state is saved with the input).
        recompute = self.grad_checkpoint and torch.is_grad_enabled() and kv_cache is None
        for layer, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, mask, rope, None, layer, use_reentrant=False)
            else:
                x = block(x, mask, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)
        return x if packing is None else packing.unpack(x)  # (B, T, C), zero at the pads

    def forward(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None, labels=None,
                temperature: float = 1.0, entropy: bool = False):
        """Next-token logits (B, T, vocab_size) at every position. Given labels (B, T) instead,
        the log-prob (B, T - 1) of each labelled next token at temperature, as token_logps
        computes it from the logits, without them (label_logps); entropy=True adds each labelled
        position's entropy. Through forward, so DDP and FSDP see the head's use."""
        hidden = self.hidden_states(input_ids, attention_mask, kv_cache)
        if labels is None:
            return self.lm_head(hidden)
        return label_logps(hidden, self.lm_head.weight, labels, temperature, entropy)

    def all_done(self, done: torch.Tensor) -> bool:
        """Whether every sequence has ended: on every rank when the model is sharded (FSDP), whose
        forward is collective, so that all ranks run the same number of steps."""
        fsdp = sys.modules.get("torch.distributed.fsdp")  # a second to import; nothing is sharded before it is
        if fsdp is None or not isinstance(self, fsdp.FSDPModule):
            return bool(done.all())
        pending = (~done).sum()
        torch.distributed.all_reduce(pending)
        return pending.item() == 0

    @torch.no_grad()  # not inference_mode: FSDP's all-gathered weights are reused by training after it
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, logits_processor=None):
        """Sample continuations of a batch of prompts (token id lists of any lengths).

        Prompts are left-padded so that every sequence's next token goes in the same column.
        temperature 0 means greedy; top_k keeps the k likeliest tokens, top_p the smallest set
        whose probability reaches p (nucleus sampling). A sequence stops at its first stop id (the
        tokenizer's eos ids and a chat template's end-of-turn token).
        Returns completion ids (B, max_new_tokens), pad after the stop, and their mask (1 up to and
        including the stop token). use_cache=False recomputes the whole sequence at every step, as a check.
        logits_processor(input_ids (B, T), logits (B, V)) -> logits, if given, reshapes each step's
        next-token logits from the sequences so far (the ceiling's proposals)."""
        was_training = self.training
        self.eval()
        device = self.lm_head.weight.device
        input_ids, attention_mask = left_pad(prompts, pad_id, device)
        B, P = input_ids.shape
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, P + max_new_tokens)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        step_ids = input_ids  # the tokens not yet seen by the model
        for t in range(max_new_tokens):
            if use_cache:
                h = self.hidden_states(step_ids, attention_mask, cache)
            else:
                h = self.hidden_states(input_ids, attention_mask)
            logits = self.lm_head(h[:, -1]).float()  # (B, V)
            if not bool(torch.isfinite(logits).all()):  # a diverged model: NaN probabilities sample no token
                raise FloatingPointError("the model's next-token logits are NaN or infinite (its weights diverged)")
            if logits_processor is not None:
                logits = logits_processor(input_ids, logits)
            next_id = sample_token(logits, temperature, top_k, top_p, generator)
            out[:, t] = torch.where(done, pad_id, next_id)
            mask[:, t] = (~done).long()
            done |= torch.isin(next_id, stop)
            if self.all_done(done):
                break
            step_ids = next_id[:, None]
            input_ids = torch.cat([input_ids, step_ids], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
        self.train(was_training)
        return out, mask


def sample_token(logits, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None):
    """One token id per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # tokens past the nucleus; the first is always kept
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    # inverse-CDF sampling: the first token whose cumulative probability passes u ~ U(0, total),
    # exact like torch.multinomial and an order of magnitude faster on the CPU; in float64, so
    # that the cumulative sum's rounding is far below any probability that float32 represents
    cdf = logits.softmax(-1).double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never past the last token
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # cdf[i - 1] <= u < cdf[i]: p[i] > 0


HEAD_CHUNK = 2**24  # the most logits label_logps holds at once (64 MB in float32): rows x vocabulary
# the most softmax probabilities HeadLogps keeps from the forward for the backward (256 MB in float32), whole
# chunks in order; past it, chunks are computed again in the backward (one more head matmul each). It holds a
# batch of 4 x 256 labelled tokens at a 50k vocabulary (200 MB), so a common small step does no more matmuls
# than the full logits would, while a larger batch or vocabulary adds at most this much to the step's peak
HEAD_KEEP = 2**26


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _chunk_logits(hidden, weight, dtype, temperature: float) -> torch.Tensor:
    """(n, V) float32 logits of hidden rows (n, C) under the head (V, C), matmul in `dtype`."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return logits / temperature if temperature != 1.0 else logits


class HeadLogps(torch.autograd.Function):
    """log p(target) of each row of hidden (N, C) under the head `weight` (V, C), (N,) float32,
    n rows (HEAD_CHUNK logits) at a time, so the (N, V) logits never exist whole. The forward
    keeps each row's logsumexp and the softmax of its first chunks, up to `keep` probabilities;
    the backward computes the other chunks' logits again, and takes d log p / d logits =
    onehot - softmax (times the incoming gradient) straight from the softmax. Only the gradients
    that are needed are computed: a frozen head (LoRA) costs one matmul a chunk, not two."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, n: int, keep: int):
        dtype, logps, lses, probs = _compute_dtype(hidden), [], [], []
        for i in range(0, max(1, len(hidden)), n):
            logits = _chunk_logits(hidden[i:i + n], weight, dtype, temperature)
            lse = logits.logsumexp(1)
            logps.append(logits.gather(1, targets[i:i + n, None]).squeeze(1) - lse)
            lses.append(lse)
            if (len(probs) + 1) * n * weight.size(0) <= keep:
                probs.append(logits.sub_(lse[:, None]).exp_())  # (n, V) softmax, in place
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lses), *probs)
        ctx.dtype, ctx.temperature, ctx.n = dtype, temperature, n
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, *probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device) if need_weight else None
        for j, i in enumerate(range(0, len(hidden), ctx.n)):
            h, g = hidden[i:i + ctx.n], grad[i:i + ctx.n] / ctx.temperature  # d logits / d (h W^T) = 1 / T
            if j < len(probs):  # overwritten in place: a fresh (n, V) tensor a chunk cost 5-10% of the
                d_logits = probs[j]  # head's time; a second backward (retain_graph=True) is refused by torch
            else:
                d_logits = _chunk_logits(h, weight, ctx.dtype, ctx.temperature).sub_(lse[i:i + ctx.n, None]).exp_()
            d_logits.mul_(-g[:, None])
            d_logits[torch.arange(len(h), device=h.device), targets[i:i + ctx.n]] += g  # -softmax x g + onehot x g
            d_logits = d_logits.to(ctx.dtype)
            if need_hidden:
                grad_hidden[i:i + ctx.n] = d_logits @ weight.to(ctx.dtype)
            if need_weight:
                grad_weight += d_logits.T @ h.to(ctx.dtype)  # summed over chunks in float32
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def _head_logps(hidden, weight, targets, temperature: float):
    """Each row's log-prob of its target and its distribution's entropy, from the (n, V) logits."""
    logq = _chunk_logits(hidden, weight, _compute_dtype(hidden), temperature).log_softmax(1)
    return logq.gather(1, targets[:, None]).squeeze(1), -(logq.exp() * logq).sum(1)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False):
    """token_logps computed from the final hidden states (B, T, C) and the head's weight, without
    the full (B, T, V) logits: only labelled positions meet the head (prompt and pad rows are
    skipped), HEAD_CHUNK logits at a time (HeadLogps), at most HEAD_KEEP of them kept for the
    backward. Returns (B, T - 1) float32, 0 where the label is IGNORE_INDEX; with entropy=True
    (without a gradient) also the entropy (B, T - 1) of each labelled position's distribution,
    0 elsewhere."""
    B, T, C = hidden.shape
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX  # (B, T-1)
    rows, y = hidden[:, :-1][labelled], targets[labelled]  # (N, C), (N,)
    n = max(1, HEAD_CHUNK // weight.size(0))
    zeros = torch.zeros(B, T - 1, device=hidden.device)
    if not entropy:
        keep = HEAD_KEEP if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad) else 0
        return zeros.masked_scatter(labelled, HeadLogps.apply(rows, weight, y, temperature, n, keep))
    if torch.is_grad_enabled():
        raise ValueError("label_logps: entropy is for passes without a gradient")
    parts = [_head_logps(rows[i:i + n], weight, y[i:i + n], temperature) for i in range(0, max(1, len(rows)), n)]
    return tuple(zeros.masked_scatter(labelled, torch.cat(p)) for p in zip(*parts))


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The log-probability of each labelled next token, from full logits: logits (B, T, V) at t
    score labels (B, T) at t + 1, so both are shifted by one. Returns (B, T - 1) in float32, 0
    where the label is IGNORE_INDEX (prompt and pad tokens). The definition the model's own
    labelled log-probs (label_logps, which every loss uses) are tested against; the ceiling's
    tilted logits take it directly."""
    B, T, V = logits.shape
    return -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                            ignore_index=IGNORE_INDEX, reduction="none").view(B, T - 1)


if __name__ == "__main__":  # the preset table of docs/real-models.md
    print("| preset | n_layer | n_head | n_embd | block_size | parameters (512-piece vocab) | training GFLOPs/token at block_size |")
    print("|---|---|---|---|---|---|---|")
    for name, preset in PRESETS.items():
        m = GPT(GPTConfig(vocab_size=512, **preset))
        print(f"| {name} | {preset['n_layer']} | {preset['n_head']} | {preset['n_embd']} | {preset['block_size']} "
              f"| {m.num_params() / 1e6:.2f}M | {m.flops_per_token(preset['block_size']) / 1e9:.3f} |")
