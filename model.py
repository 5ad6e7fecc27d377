"""
One decoder-only transformer, configured to be any of the families this project loads: the toy
GPT (pre-LayerNorm blocks, learned positions, GELU, tied embeddings, GPT-2 initialisation),
GPT-2 itself, and the Llama family and its descendants (Llama 3, Mistral, Qwen2 and 3, SmolLM,
Phi-3, OLMo 2, Gemma 3: RMSNorm, rotary positions, gated MLPs, grouped-query attention), each
difference a named GPTConfig field. Attention goes through scaled_dot_product_attention. The
forward pass is padding-aware (positions come from the attention mask and pad tokens are never
attended to), so a sequence's logits do not depend on how it is padded or batched. `generate`
samples with a preallocated KV cache.

Beside the model, the batch layouts every algorithm shares (left-padded prompts, a pair batch
as chosen then rejected rows, IGNORE_INDEX labels). Given labels, the model takes their
log-probs from head.py without the full logits (head.token_logps is the definition from
logits); a ragged batch is packed by packing.py; masks are masks.py's and rotary positions
rope.py's. It imports nothing else of the project: no training, no data files, no file formats
(hf.py reads folders and checks any config read from a file).
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from head import IGNORE_INDEX, label_logps  # IGNORE_INDEX: defined with the head, which skips its rows
from masks import attention_mask_4d, sliding_window
from packing import Packing
from rope import apply_rope, rope_cos_sin


@dataclass
class GPTConfig:
    """A model's shape and family. Built in code it is trusted; a config read from a file (a
    checkpoint's model_config, a config.json) is checked by hf.check_config before it is built."""
    vocab_size: int = 512  # token ids, and rows of the embedding and the output head
    block_size: int = 128  # longest sequence, prompt and completion together
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # probability, after the embeddings, attention and each residual branch
    bias: bool = False  # biases in every Linear and LayerNorm layer (GPT-2)
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # MLP width; None: 4 * n_embd
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5  # added to the variance in every norm
    mlp: str = "gelu"  # "gelu", "gelu_tanh" (GPT-2's approximation) or "swiglu" (Llama)
    pos: str = "learned"  # "learned" (a position embedding table) or "rope" (rotary)
    rope_theta: float = 10000.0  # rotary base frequency
    # Llama 3's rotary frequency scaling: (factor, low_freq_factor, high_freq_factor, original context); None: none
    rope_scaling: tuple | None = None
    rotary_dim: int | None = None  # the leading dims of each head that rotate (Phi's partial rotary); None: all
    rope_layers: tuple | None = None  # per layer, whether it rotates queries and keys (SmolLM3: 0, no positions)
    qkv_bias: bool = False  # biases on the query, key and value projections alone (Qwen2)
    # an RMSNorm over queries and keys before the rotation: "head", each head's (Qwen3); "projection", the
    # whole projection's (OLMo 2); None: none
    qk_norm: str | None = None
    norm_after: bool = False  # norms on the outputs of attention and MLP (OLMo 2, Gemma 3)
    norm_before: bool | None = None  # norms on their inputs; None: unless norm_after (Gemma 3: both, four a block)
    norm_offset: bool = False  # RMSNorm scales by 1 + weight, in float32 (Gemma, whose weights are stored around 0)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd), rounded to their dtype (Gemma)
    attn_scale: float | None = None  # attention logits' scale; None: 1 / sqrt(head_dim)
    layer_windows: tuple | None = None  # per layer, its sliding window in tokens, 0: full attention; None: all full
    rope_local_theta: float | None = None  # rotary base of the sliding-window layers (Gemma 3); None: rope_theta
    tie_embeddings: bool = True  # the output head shares the token embedding's weights
    family: str | None = None  # the model_type of the folder it was read from: names, not computation; None: ours

    def __post_init__(self):  # the defaults, and a head split they can be computed from
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}) "
                             "unless head_dim is given")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        self.norm_before = not self.norm_after if self.norm_before is None else self.norm_before
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")


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
    Normalised in float32 and cast back before the weight, as the Llama reference code does;
    with `offset`, scaled by 1 + weight before the cast, as Gemma's code does."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.n_embd, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)  # Ba et al. 2016


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        # query, key and value projections in one matmul; loaders concatenate separate q/k/v weights
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias)
        if config.qk_norm:
            per_head = config.qk_norm == "head"
            self.q_norm = make_norm(config, config.head_dim if per_head else q_size)
            self.k_norm = make_norm(config, config.head_dim if per_head else kv_size)
        self.qk_norm, self.scale = config.qk_norm, config.attn_scale
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, rope, kv_cache, layer):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        if self.qk_norm == "projection":  # over all n_head * hs (n_kv * hs) features
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
                for t in (k, v))  # (B, n_kv, T, hs)
        if self.qk_norm == "head":  # over each head's hs features
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, n_kv, T_past + T, hs)
        # grouped-query attention (Ainslie et al. 2023): query head h reads key/value head
        # h // (n_head / n_kv_head)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.intermediate_size
        # SwiGLU and GeGLU (Shazeer 2020, eq. 6) have two input projections, gate and up: one matmul here
        n_in = 2 * width if self.kind in ("swiglu", "geglu") else width
        self.c_fc = nn.Linear(config.n_embd, n_in, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind in ("swiglu", "geglu"):
            gate, up = h.chunk(2, dim=-1)
            # Gemma's GeGLU gates with GELU's tanh approximation
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        else:  # GELU (Hendrycks & Gimpel 2016); GPT-2 uses its tanh approximation
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block (GPT-2, Radford et al. 2019): x + attn(ln_1(x)), then x + mlp(ln_2(x)).
    With norm_after, the outputs are normed too: x + ln_attn_out(attn(ln_1(x))) and the same for
    the MLP (Gemma 3's four norms), or only the outputs, where norm_before is off (OLMo 2)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        before = make_norm if config.norm_before else lambda config: nn.Identity()
        after = make_norm if config.norm_after else lambda config: nn.Identity()
        self.ln_1, self.ln_attn_out = before(config), after(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2, self.ln_mlp_out = before(config), after(config)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, rope, kv_cache, layer):
        x = x + self.ln_attn_out(self.attn(self.ln_1(x), attn_mask, rope, kv_cache, layer))
        return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))


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


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        # registered in this order, so a seed gives the toy GPT its old initial weights
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.grad_checkpoint = False  # recompute each block's activations in the backward pass
        self.packing = True  # a padded batch without a KV cache runs as Packing's fewer rows (not compiled)
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
        packable = (self.packing and attention_mask is not None and kv_cache is None
                    and not torch.compiler.is_compiling())
        packing = Packing.of(attention_mask) if packable else None
        if packing is not None:
            # (R, W) rows
            input_ids, pos, mask = packing.pack(input_ids), packing.positions, packing.attn_mask
            key_pos = pos
        else:
            if attention_mask is None:
                key_pos = torch.arange(past + T, device=input_ids.device)[None]  # (1, past + T)
            else:  # a token's position is the number of real tokens before it, whatever the padding
                key_pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, past + T)
            pos = key_pos[:, past:]  # (B, T)
            mask = attention_mask_4d(attention_mask, past, T, input_ids.device)
        c = self.config
        windows = c.layer_windows or (0,) * c.n_layer
        # each layer's mask by its window: 0 (full attention) and a window the sequence fits in leave it as it is
        masks = {w: mask if w == 0 or key_pos.size(-1) <= w else sliding_window(mask, pos, key_pos, w)
                 for w in set(windows)}
        x = self.transformer.wte(input_ids)
        if c.embed_scale:  # Gemma: the scale rounded to the weights' dtype, as its reference code does
            x = x * torch.tensor(c.n_embd ** 0.5, dtype=x.dtype)
        ropes = {}
        if c.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # the sliding-window layers may have their own base (Gemma 3's local layers)
            for w in set(windows):
                local = w and c.rope_local_theta
                theta, scaling = (c.rope_local_theta, None) if local else (c.rope_theta, c.rope_scaling)
                ropes[w] = rope_cos_sin(pos, c.rotary_dim or c.head_dim, theta, x.dtype, scaling)
        x = self.transformer.drop(x)
        # gradient checkpointing (Chen et al. 2016) keeps only each block's input for the backward
        # pass and runs the block again there: memory of one block's activations, a third more compute.
        # The recomputation replays the same dropout masks (the RNG state is saved with the input).
        recompute = self.grad_checkpoint and torch.is_grad_enabled() and kv_cache is None
        for layer, (block, w) in enumerate(zip(self.transformer.h, windows)):
            rotates = c.rope_layers is None or c.rope_layers[layer]
            rope = ropes.get(w) if rotates else None  # a layer without positions (SmolLM3's NoPE layers)
            if recompute:
                x = checkpoint(block, x, masks[w], rope, None, layer, use_reentrant=False)
            else:
                x = block(x, masks[w], rope, kv_cache, layer)
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
        # a second to import; nothing is sharded before it is
        fsdp = sys.modules.get("torch.distributed.fsdp")
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
                raise FloatingPointError("the model's next-token logits are NaN or infinite "
                                         "(its weights diverged)")
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
    # u < total: never past the last token
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # cdf[i - 1] <= u < cdf[i]: p[i] > 0


if __name__ == "__main__":  # the preset table of docs/real-models.md
    print("| preset | n_layer | n_head | n_embd | block_size | parameters (512-piece vocab) "
          "| training GFLOPs/token at block_size |")
    print("|---|---|---|---|---|---|---|")
    for name, preset in PRESETS.items():
        m = GPT(GPTConfig(vocab_size=512, **preset))
        print(f"| {name} | {preset['n_layer']} | {preset['n_head']} | {preset['n_embd']} "
              f"| {preset['block_size']} | {m.num_params() / 1e6:.2f}M "
              f"| {m.flops_per_token(preset['block_size']) / 1e9:.3f} |")
