"""
Benchmark every stage's hot path against this machine's own limit: tokens per second, model-FLOPs
utilisation (MFU) and peak memory of an SFT step, a DPO step (live and precomputed reference), a
reward-model step, a PPO update, and rollout generation with and without the KV cache; and, for
the shapes of real small models (random weights, nothing downloaded), parameters, memory, and
speed beside transformers.

    python bench.py                                   # tiny and small presets on this machine
    python bench.py --presets tiny --steps 3 --json out/bench.json
    python bench.py --presets none --real_shapes --vs_transformers   # real shapes; needs transformers
    python bench.py --presets none --memory           # peak memory of SFT and DPO steps at
                                                      # SmolLM2-135M's shape
    python bench.py --presets none --sharding         # per-GPU memory under DDP and FSDP, 1.1B and 7B
                                                      # (computed)

MFU = model FLOPs per second / a matrix-multiply peak that this script measures itself, on the
same device and dtype, in the same run (a large square matmul, median of repeats); never a
datasheet number. Model FLOPs come from GPT.flops_per_token (6 per parameter per token plus
attention, forward and backward), a reference or frozen forward counting a third of that.
Warm-up steps are excluded and medians reported. Data are random tokens: speed does not depend
on them.
"""
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

import head
import train_dpo
import train_ppo
import train_rm
from distributed import Dist, pick_device
from dpo import concatenated_forward
from hf import config_from_hf, load_folder
from lora import TARGETS, AdaptersOff, attach_lora
from head import token_logps
from model import GPT, GPTConfig, IGNORE_INDEX, PRESETS
from ppo import PolicyAndCritic
from reward_model import RewardModel
from train_dpo import dpo_batch_loss
from train_ppo import ppo_batch_loss
from train_rm import rm_batch_loss
from train_sft import sft_loss
from train_utils import (add_sums, autocast, batch_means, check_weights, clip_grad_norm, make_optimizer,
                         parse_config)


@dataclass
class Config:
    presets: str = "tiny,small"
    """comma-separated model presets to measure (none: no preset)"""
    seq_len: str = "64,256"
    """sequence length for each preset, in the same order"""
    batch_size: int = 8
    """sequences (pairs for DPO and RM) per step"""
    steps: int = 5
    """measured steps per benchmark (the median is reported)"""
    warmup: int = 2
    """steps run first and not measured"""
    gen_batch: int = 16
    """prompts per generation benchmark"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    json: str = "out/bench.json"
    """where the table goes as JSON"""
    real_shapes: bool = False
    """print parameters and bf16 memory (inference, full fine-tuning) of REAL_SHAPES, and the memory of SFT, DPO
    and DPO with LoRA for the smallest model of each family (FAMILY_SHAPES)"""
    vs_transformers: bool = False
    """time a forward+backward step and KV-cache generation at SmolLM2-135M's shape, this project's
    model against transformers' with the same weights (imports transformers)"""
    real_batch: int = 4
    """sequences per step for --vs_transformers"""
    real_seq_len: int = 256
    """sequence length for --vs_transformers"""
    memory: bool = False
    """peak memory of an SFT and a DPO step at --memory_shape: full fine-tuning or LoRA, gradient
    checkpointing or not, the reference as a copy or as the adapters switched off (each in a fresh process)"""
    sharding: bool = False
    """print the per-GPU memory of the model states under DDP and FSDP for SCALE_SHAPES, computed"""
    memory_shape: str = "SmolLM2-135M"
    """the REAL_SHAPES model measured by --memory; the others are computed from its measurement"""
    memory_batch: int = 4
    """sequences per SFT step for --memory (a DPO step takes half as many pairs: the same rows)"""
    memory_seq_len: int = 256
    """sequence length for --memory"""
    logps: bool = False
    """an SFT and a DPO step (live reference) at --memory_shape, batch 2 x --memory_batch rows (DPO: that
    many pairs' rows), the labelled log-probs from the full (B, T, V) logits (the path before
    model.label_logps) against the model's own labelled log-probs, and DPO's with --grad_checkpoint, DPO's
    also with none of the head's softmax kept for the backward (head.HEAD_KEEP 0): peak memory and step
    time, each in fresh processes, and their ratios"""
    memory_case: str = ""
    """(internal) one --memory configuration as JSON, measured in this process"""


# config.json values of published models, for random weights at their real shapes
REAL_SHAPES = {
    "SmolLM2-135M": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "TinyLlama-1.1B": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False),
}


# the smallest published model of each family the loader reads, its config.json values (rope scaling
# left out: it changes no size); Phi-4-mini's longrope is refused, so Phi-3-mini stands for Phi-3
FAMILY_SHAPES = {
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         max_position_embeddings=32768, sliding_window=512),
    "SmolLM3-3B": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=65536, tie_word_embeddings=True),
    "Phi-3-mini-4k": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False),
    "OLMo-2-0425-1B": dict(model_type="olmo2", vocab_size=100352, hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                           max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False),
}


def family_memory_table() -> list[str]:
    """Model-state memory of an SFT step, a DPO step and a DPO step with LoRA (rank LORA_RANK on every
    projection) for each FAMILY_SHAPES model, computed from parameter counts as this project's
    trainers hold them: float32 weights (4 bytes a parameter), and for each trained one a float32
    gradient and two AdamW moments (12 more); DPO's reference a frozen float32 copy (4), or
    bfloat16 with --frozen_dtype bfloat16 (2); with LoRA the reference is the base with its
    adapters off, no copy. Activations not included."""
    lines = ["| model | model_type | parameters | SFT | DPO | DPO, bf16 reference | DPO with LoRA | the same, "
             "bf16 base |", "|---|---|---|---|---|---|---|---|"]
    for name, shape in FAMILY_SHAPES.items():
        with torch.device("meta"):
            model = GPT(config_from_hf(shape, name))
            n = model.num_params(non_embedding=False)
            lora = sum(p.numel() for p in attach_lora(model, LORA_RANK, LORA_RANK, ["all"]).parameters()
                       if p.requires_grad)
        gib = [x / 2 ** 30 for x in (16 * n, 20 * n, 18 * n, 4 * n + 16 * lora, 2 * n + 16 * lora)]
        lines.append(f"| {name} | {shape['model_type']} | {n / 1e6:.0f}M | "
                     + " | ".join(f"{g:.2f} GiB" for g in gib) + " |")
    return lines


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` runs after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device, dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in the benchmark's dtype: the limit MFU is measured against."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    seconds = timed(lambda: a @ b, device, repeats, 2)
    return 2 * n ** 3 / seconds


def peak_memory_mb(device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set (it only grows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch(B: int, T: int, V: int, device, prefix: str = "") -> dict:
    ids = torch.randint(4, V, (B, T), device=device)
    labels = ids.clone()
    labels[:, : T // 4] = IGNORE_INDEX  # a prompt quarter carries no loss
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": torch.ones_like(ids),
            f"{prefix}labels": labels}


class FullLogits(torch.nn.Module):
    """A model whose labelled log-probs come from its full (B, T, V) logits by token_logps: the
    way every loss computed them before model.label_logps, the baseline of --logps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None, temperature: float = 1.0):
        logits = self.model(input_ids, attention_mask)
        return logits if labels is None else token_logps(logits / temperature, labels)


def one_step(model, optimizer, n: int, ctx, loss, *inputs) -> dict[str, float]:
    """One optimizer step as the train_X.py loops take it, on one process and one micro-batch:
    the script's loss summed over n terms, loss.backward() of its mean, then the means, the
    clipped norm, optimizer.step(), zero_grad and the finite-weights guard."""
    with ctx:
        loss_sum, metric_sums = loss(model, *inputs)
    (loss_sum * (1 / n)).backward()
    dist = Dist(False, 0, 0, 1, loss_sum.device)
    stats = batch_means(add_sums({}, loss_sum, metric_sums), n, dist, 1)
    stats["grad_norm"] = clip_grad_norm(model, 1.0, 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    check_weights(model, dist, 1)
    return stats


def bench_preset(cfg: Config, preset: str, T: int, device, peak: float) -> list[dict]:
    torch.manual_seed(0)
    V = 512
    ctx = autocast(device, cfg.dtype)
    B = cfg.batch_size
    shape = {**PRESETS[preset], "block_size": max(PRESETS[preset]["block_size"], T + 128)}
    policy = GPT(GPTConfig(vocab_size=V, **shape)).to(device)
    reference = GPT(policy.config).to(device).eval().requires_grad_(False)
    flops_tok = policy.flops_per_token(T)  # forward + backward
    opt = make_optimizer(policy, 1e-4, 0.0, (0.9, 0.95), device)
    rows = []

    def add(name, seconds, tokens, flops, model_seconds=None):
        row = {"preset": preset, "seq_len": T, "benchmark": name, "ms": 1000 * seconds,
               "tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak,
               "peak_mem_mb": peak_memory_mb(device)}
        if model_seconds is not None:  # share of the step spent outside the model's forward and backward
            row["overhead"] = max(0.0, 1 - model_seconds / seconds)
        rows.append(row)
        print(f"  {preset:6s} T={T:4d} {name:34s} {row['ms']:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s  "
              f"MFU {row['mfu']:.1%}", flush=True)

    # SFT: one optimizer step; and the bare forward + backward, to see the overhead around it
    def model_only(model, loss, *inputs):
        """Seconds of the bare forward and backward, to compare with the whole step."""
        def fwd_bwd():
            with ctx:
                loss_sum, _ = loss(model, *inputs)
            loss_sum.backward()
            model.zero_grad(set_to_none=True)
        return timed(fwd_bwd, device, cfg.steps, cfg.warmup)

    sft = random_batch(B, T, V, device)
    step_s = timed(lambda: one_step(policy, opt, B * T, ctx, sft_loss, sft), device, cfg.steps, cfg.warmup)
    add("sft step", step_s, B * T, flops_tok * B * T, model_only(policy, sft_loss, sft))

    # DPO: train_dpo.py's loss, chosen and rejected in one forward; the reference live, or its
    # log-probs precomputed
    pairs = {**random_batch(B, T, V, device, "chosen_"), **random_batch(B, T, V, device, "rejected_")}
    with torch.no_grad():
        (pairs["reference_chosen_logps"],
         pairs["reference_rejected_logps"]) = concatenated_forward(reference, pairs)
    n = 2 * B * T
    for live in (True, False):
        dpo_cfg = train_dpo.Config(precompute_ref=not live)
        seconds = timed(lambda: one_step(policy, opt, B, ctx, dpo_batch_loss, pairs, reference, dpo_cfg),
                        device, cfg.steps, cfg.warmup)
        add(f"dpo step, {'live reference' if live else 'precomputed ref'}", seconds, n,
            flops_tok * n * (4 / 3 if live else 1),
            model_only(policy, dpo_batch_loss, pairs, reference, dpo_cfg))

    # reward model: train_rm.py's Bradley-Terry loss on pairs
    rm = RewardModel(policy.config).to(device)
    rm_opt = make_optimizer(rm, 1e-4, 0.0, (0.9, 0.95), device)
    add("reward model step",
        timed(lambda: one_step(rm, rm_opt, B, ctx, rm_batch_loss, pairs, train_rm.Config()),
              device, cfg.steps, cfg.warmup), n, flops_tok * n)

    # PPO: one minibatch step of train_ppo.py's clipped policy and value losses (ppo_losses), through
    # policy and critic together; the response is the last three quarters of each row
    both = PolicyAndCritic(policy, RewardModel(policy.config).to(device))
    both_opt = make_optimizer(both, 1e-4, 0.0, (0.9, 0.95), device)
    P = T // 4
    g = torch.Generator(device).manual_seed(0)
    rollout = {"input_ids": sft["input_ids"], "attention_mask": sft["attention_mask"],
               "response_mask": torch.ones(B, T - P, device=device),
               **{k: torch.randn(B, T - P, generator=g, device=device)
                  for k in ("old_logprobs", "old_values", "advantages", "returns")}}
    ppo_cfg = train_ppo.Config()
    add("ppo minibatch step (policy+critic)",
        timed(lambda: one_step(both, both_opt, B * (T - P), ctx, ppo_batch_loss, rollout, P, ppo_cfg),
              device, cfg.steps, cfg.warmup),
        B * T, 2 * flops_tok * B * T, model_only(both, ppo_batch_loss, rollout, P, ppo_cfg))
    # the same step on a ragged rollout of 4B rows (32 at the default batch: a minibatch of the
    # default train_ppo.py run), responses of 1 to T - P tokens with a pad-filled tail as generation
    # leaves it: the padded batch, and model.Packing's fewer rows of whole sequences. Tokens and
    # FLOPs count real tokens only, so MFU is the useful work's
    R = 4 * B
    lengths = torch.randint(1, T - P + 1, (R,), generator=g, device=device)
    ragged_mask = (torch.arange(T - P, device=device)[None] < lengths[:, None]).float()
    ragged = {"input_ids": torch.randint(4, V, (R, T), generator=g, device=device),
              "response_mask": ragged_mask,
              "attention_mask": torch.cat([torch.ones(R, P, device=device), ragged_mask], 1).long(),
              **{k: torch.randn(R, T - P, generator=g, device=device)
                 for k in ("old_logprobs", "old_values", "advantages", "returns")}}
    n_real = int(ragged["attention_mask"].sum())
    for packing in (False, True):
        policy.packing = both.critic.backbone.packing = packing
        seconds = timed(lambda: one_step(both, both_opt, int(ragged_mask.sum()), ctx, ppo_batch_loss,
                                         ragged, P, ppo_cfg), device, cfg.steps, cfg.warmup)
        add(f"ppo step, ragged rollout, {'packed' if packing else 'padded'}", seconds, n_real,
            2 * flops_tok * n_real)

    # generation: tokens per second with and without the KV cache
    prompts = [torch.randint(4, V, (16,)).tolist() for _ in range(cfg.gen_batch)]
    for new in (32, 128):
        for cache in (True, False):
            def gen():
                with ctx:
                    policy.generate(prompts, new, stop_ids=[], pad_id=0, temperature=1.0, use_cache=cache,
                                    generator=torch.Generator(device).manual_seed(0))
            seconds = timed(gen, device, max(1, cfg.steps // 2), 1)
            add(f"generate {new} tokens, {'KV cache' if cache else 'no cache'}", seconds, cfg.gen_batch * new,
                policy.flops_per_token(16 + new) / 3 * cfg.gen_batch * new)
    return rows


def real_shape_table() -> list[str]:
    """Parameters and bf16 memory of each REAL_SHAPES model, computed (a model on the meta device
    allocates nothing). Activations are left out: they depend on batch and length."""
    lines = ["| model | parameters | bf16 weights (inference) | KV cache per 1k tokens "
             "| full fine-tuning, bf16 + AdamW | the same, float32 master weights |",
             "|---|---|---|---|---|---|"]
    for name, shape in REAL_SHAPES.items():
        with torch.device("meta"):
            model = GPT(config_from_hf(shape, name))
        n, c = model.num_params(non_embedding=False), model.config
        kv_per_token = 2 * c.n_layer * c.n_kv_head * c.head_dim * 2  # keys and values, bf16
        lines.append(f"| {name} | {n / 1e6:.1f}M | {2 * n / 2**30:.2f} GiB | "
                     f"{kv_per_token * 1024 / 2**20:.0f} MiB "
                     f"| {12 * n / 2**30:.2f} GiB | {16 * n / 2**30:.2f} GiB |")
    return lines


SCALE_SHAPES = {
    "TinyLlama-1.1B": REAL_SHAPES["TinyLlama-1.1B"],
    "Mistral-7B": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}
WORLD_SIZES = [1, 2, 4, 8, 16]


def sharded_memory(n_params: int, block_params: int, root_params: int, world_size: int, parallel: str,
                   trained: int = 1, frozen: int = 0) -> float:
    """Bytes per GPU of the model states of full fine-tuning with AdamW, float32 master weights and
    bfloat16 compute (--dtype bfloat16), for `trained` models that train and `frozen` ones that do
    not (SFT 1 and 0; DPO 1 and 1, its reference; PPO 2 and 2, policy and critic, reference and
    reward model): 4 (weights) + 4 (gradients) + 8 (two moments) bytes a trained parameter, and 2
    a frozen one in bfloat16 (--frozen_dtype bfloat16). DDP keeps all of it on every GPU, and with
    2 or more its gradient buckets another 4 bytes a trained parameter. FSDP keeps 1/world_size of
    it, plus what is unsharded for a moment: each trained model's root (embeddings, head: FSDP2
    keeps a root gathered from its forward to its backward) and two blocks (the one running and
    the one prefetched), bfloat16 weights and float32 gradients, 6 bytes a parameter. Activations
    are left out: they depend on batch, length and checkpointing."""
    states = (16 * trained + 2 * frozen) * n_params
    if parallel == "ddp":
        return states + 4 * trained * n_params * (world_size > 1)
    return states / world_size + 6 * (trained * root_params + 2 * block_params)


STAGES = {"SFT": (1, 0), "DPO": (1, 1), "PPO": (2, 2)}
"""models that train and frozen ones, for sharded_memory"""


def sharding_table() -> list[str]:
    """sharded_memory for SCALE_SHAPES, each of STAGES, DDP and FSDP at WORLD_SIZES, in GB (1e9 bytes)."""
    lines = ["| model | stage | parallel | " + " | ".join(f"N={n}" for n in WORLD_SIZES) + " |",
             "|---|---|---|" + "---|" * len(WORLD_SIZES)]
    for name, shape in SCALE_SHAPES.items():
        with torch.device("meta"):
            model = GPT(config_from_hf(shape, name))
        n = model.num_params(non_embedding=False)
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = n - block * len(model.transformer.h)
        for stage, (trained, frozen) in STAGES.items():
            for parallel in ("ddp", "fsdp"):
                cells = [sharded_memory(n, block, root, w, parallel, trained, frozen) / 1e9
                         for w in WORLD_SIZES]
                lines.append(f"| {name} ({n / 1e9:.2f}B) | {stage} | {parallel} | "
                             + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return lines


def bench_vs_transformers(cfg: Config, device, peak: float) -> list[dict]:
    """SmolLM2-135M's shape: a forward+backward step and 32 tokens of greedy KV-cache generation,
    this project's model against transformers' LlamaForCausalLM holding the same weights."""
    import tempfile

    import transformers
    shape = {k: v for k, v in REAL_SHAPES["SmolLM2-135M"].items() if k != "model_type"}
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, bos_token_id=0, eos_token_id=0))
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:  # a stand-in: the loader wants one
            f.write('{"version": "1.0", "added_tokens": [{"id": 0, "content": "<|endoftext|>", '
                    '"special": true, "single_word": false, "lstrip": false, "rstrip": false, '
                    '"normalized": false}], "model": {"type": "WordLevel", '
                    '"vocab": {"<|endoftext|>": 0}, "unk_token": "<|endoftext|>"}}')
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            f.write('{"eos_token": "<|endoftext|>"}')
        ours, _ = load_folder(folder)
    ours, theirs = ours.to(device), theirs.to(device)
    ctx = autocast(device, cfg.dtype)
    B, T = cfg.real_batch, cfg.real_seq_len
    ids = torch.randint(1, shape["vocab_size"], (B, T), device=device)
    mask = torch.ones_like(ids)
    prompts = ids[:, :16].tolist()
    rows = []
    def step(model):  # each library's own training loss: the mean next-token cross-entropy
        with ctx:
            if model is ours:
                loss = -model(ids, mask, labels=ids).mean()
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def generate(model):
        with ctx, torch.no_grad():
            if model is ours:
                model.generate(prompts, 32, stop_ids=[], pad_id=0, temperature=0)
            else:
                model.generate(input_ids=ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=32,
                               min_new_tokens=32, do_sample=False, pad_token_id=0)

    flops = ours.flops_per_token(T)
    generation_flops = ours.flops_per_token(48) / 3 * B * 32  # forward only: a third of forward + backward
    for name, fn, tokens, work in (("forward+backward", step, B * T, flops * B * T),
                                   ("generate 32 tokens, KV cache", generate, B * 32, generation_flops)):
        # the two libraries take turns, step by step, so that a machine whose speed drifts during
        # the run (a shared CPU's does, by tens of percent) slows both alike and the ratio holds
        times = {"this project": [], "transformers": []}
        for i in range(cfg.warmup + cfg.steps):
            for who, model in (("this project", ours), ("transformers", theirs)):
                seconds = timed(lambda: fn(model), device, 1, 0)
                if i >= cfg.warmup:
                    times[who].append(seconds)
        for who, seconds in times.items():
            seconds = statistics.median(seconds)
            rows.append({"preset": f"SmolLM2-135M shape, {who}",
                         "seq_len": T if name == "forward+backward" else 48,
                         "benchmark": f"{name}, batch {B}", "ms": 1000 * seconds,
                         "tokens_per_s": tokens / seconds,
                         "mfu": work / seconds / peak, "peak_mem_mb": peak_memory_mb(device)})
            print(f"  {who:13s} {name:30s} {1000 * seconds:9.1f} ms", flush=True)
        ratio = rows[-1]["ms"] / rows[-2]["ms"]
        rows.append({"preset": "SmolLM2-135M shape, this project's speed-up (transformers' ms / ours)",
                     "seq_len": rows[-1]["seq_len"], "benchmark": rows[-1]["benchmark"], "speedup": ratio})
        print(f"  {name}: {ratio:.2f}x transformers' speed", flush=True)
    return rows


# (stage, LoRA, gradient checkpointing, reference) of the --memory table
MEMORY_CASES = [(stage, lora, ckpt, ref) for stage, lora, ref in [
    ("SFT", False, "-"), ("SFT", True, "-"), ("DPO", False, "copy"), ("DPO", True, "copy"),
    ("DPO", True, "adapters off")]
    for ckpt in (False, True)]
LORA_RANK = 16  # the alignment-handbook's Zephyr LoRA recipe: r 16, alpha 16, every linear projection


def memory_case(case: dict, device) -> dict:
    """Peak memory of two optimizer steps (the second holds the AdamW moments) of one
    configuration, on random weights of a real shape: GPU memory allocated, or on the CPU the
    process's peak resident set less what it held before the model was built."""
    before = peak_memory_mb(device)
    torch.manual_seed(0)
    shape = REAL_SHAPES[case["shape"]]
    with device:
        policy = GPT(config_from_hf({**shape, "max_position_embeddings": case["T"]}, case["shape"]))
    reference = None
    if case["stage"] == "DPO" and case["reference"] == "copy":
        reference = GPT(policy.config).to(device).requires_grad_(False)
        reference.load_state_dict(policy.state_dict())
    if case["lora"]:
        attach_lora(policy, LORA_RANK, LORA_RANK, list(TARGETS))
    if reference is None and case["stage"] == "DPO":
        reference = AdaptersOff(policy)
    policy.grad_checkpoint = case["grad_checkpoint"]
    if "head_keep" in case:  # this process's bound on the head's softmax kept for the backward
        head.HEAD_KEEP = case["head_keep"]
    optimizer = make_optimizer(policy, 1e-5, 0.0, (0.9, 0.95), device)
    trained = policy
    if case.get("head") == "full":
        trained, reference = FullLogits(policy), None if reference is None else FullLogits(reference)
    B, T, V = case["B"], case["T"], shape["vocab_size"]
    if case["stage"] == "SFT":
        n, loss, inputs = B * T, sft_loss, [random_batch(B, T, V, device)]
    else:
        pairs = {**random_batch(B // 2, T, V, device, "chosen_"),
                 **random_batch(B // 2, T, V, device, "rejected_")}
        n, loss, inputs = B // 2, dpo_batch_loss, [pairs, reference, train_dpo.Config()]
    if case["stage"] == "DPO":
        inputs[1] = reference
    ctx = autocast(device, case["dtype"])
    one_step(trained, optimizer, n, ctx, loss, *inputs)
    t0 = time.perf_counter()
    one_step(trained, optimizer, n, ctx, loss, *inputs)
    sync(device)
    return {**case, "peak_mb": peak_memory_mb(device) - (before if device.type == "cpu" else 0),
            "seconds": time.perf_counter() - t0, "params": policy.num_params(non_embedding=False)}


def measure_case(case: dict, device, unmap_freed: bool = True) -> dict:
    """memory_case in a process of its own, so that its peak is its own. glibc keeps freed blocks
    below its mmap threshold resident; with `unmap_freed`, blocks from 64 KiB up are mapped and
    given back when freed, so the peak resident set follows the live tensors, but every step
    faults its activations' pages in anew, which slows it (by about a fifth at SmolLM2-135M's
    shape): a step's time is measured without it."""
    import subprocess
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if unmap_freed else None
    out = subprocess.run([sys.executable, __file__, f"--device={device.type}",
                          f"--memory_case={json.dumps(case)}"],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def logps_table(cfg: Config, device, name: str) -> list[str]:
    """--logps: each stage's step with the labelled log-probs from the full logits, then from
    the model's label_logps, and DPO's with --grad_checkpoint too, and both DPO steps again with
    every chunk of the head computed again in the backward (HEAD_KEEP 0), each in fresh
    processes: one for the peak memory (freed blocks unmapped), one for the time; the ratios are
    over the first row."""
    B, T = 2 * cfg.memory_batch, cfg.memory_seq_len
    lines = [f"Labelled log-probs without the full logits (head.label_logps) against from them "
             f"(token_logps of (B, T, V) logits), {cfg.memory_shape} shape on {name}, {cfg.dtype}, "
             f"full fine-tuning, one optimizer step of {B} rows x {T} tokens (DPO: {B // 2} pairs, "
             "live reference, a copy); the peak memory is the process's less what it held before the "
             "model, with freed blocks given back to the system; the "
             f"time the second of two steps, in another process. label_logps keeps at most "
             f"{head.HEAD_KEEP * 4 / 2**20:.0f} MB of the head's softmax for the backward (head.HEAD_KEEP), "
             "none kept computes every chunk again there:", "",
             "| stage | log-probs from | grad checkpoint | peak memory MB | step s | memory ratio "
             "| time ratio |",
             "|---|---|---|---|---|---|---|"]
    full = "full logits (before)", dict(head="full")
    kept = "label_logps", dict(head="labels")
    recomputed = "label_logps, none kept", dict(head="labels", head_keep=0)
    for stage, variants in (("SFT", [(full, False), (kept, False)]),
                            ("DPO", [(full, False), (kept, False), (recomputed, False), (kept, True),
                                     (recomputed, True)])):
        rows = []
        for (what, logps_from), grad_checkpoint in variants:
            case = dict(shape=cfg.memory_shape, stage=stage, lora=False, grad_checkpoint=grad_checkpoint,
                        reference="copy", B=B, T=T, dtype=cfg.dtype, **logps_from)
            rows.append({**measure_case(case, device),
                         "seconds": measure_case(case, device, False)["seconds"]})
            r = rows[-1]
            ratios = f"{r['peak_mb'] / rows[0]['peak_mb']:.2f} | {r['seconds'] / rows[0]['seconds']:.2f}"
            lines.append(f"| {stage} | {what} | {'yes' if grad_checkpoint else 'no'} | {r['peak_mb']:.0f} | "
                         f"{r['seconds']:.2f} | {ratios} |")
            print(f"  {stage} {what} grad_checkpoint={grad_checkpoint}: {r['peak_mb']:.0f} MB, "
                  f"{r['seconds']:.2f} s", flush=True)
    return lines


def memory_table(cfg: Config, device, name: str) -> list[str]:
    """Each MEMORY_CASES configuration at --memory_shape, measured in a process of its own; the
    other REAL_SHAPES computed from it: weights, gradients and AdamW state from parameter counts
    (float32: 4 bytes a weight, 4 a gradient, 8 of moments), activations scaled from this
    measurement by n_layer x hidden size."""
    rows = []
    for stage, lora, ckpt, ref in MEMORY_CASES:
        case = dict(shape=cfg.memory_shape, stage=stage, lora=lora, grad_checkpoint=ckpt, reference=ref,
                    B=cfg.memory_batch, T=cfg.memory_seq_len, dtype=cfg.dtype)
        rows.append(measure_case(case, device))
        print(f"  {stage} lora={lora} grad_checkpoint={ckpt} reference={ref}: "
              f"{rows[-1]['peak_mb']:.0f} MB", flush=True)

    def static_mb(shape: str, lora: bool, reference: str) -> float:
        with torch.device("meta"):
            model = GPT(config_from_hf(REAL_SHAPES[shape], shape))
            n = model.num_params(non_embedding=False)
            trained = sum(p.numel()
                          for p in attach_lora(model, LORA_RANK, LORA_RANK, list(TARGETS)).parameters()
                          if p.requires_grad) if lora else n
        return (4 * n + 12 * trained + (4 * n if reference == "copy" else 0)) / 2 ** 20

    def activation_scale(shape: str) -> float:
        a, b = REAL_SHAPES[shape], REAL_SHAPES[cfg.memory_shape]
        return a["num_hidden_layers"] * a["hidden_size"] / (b["num_hidden_layers"] * b["hidden_size"])

    shapes = [cfg.memory_shape] + [s for s in REAL_SHAPES if s != cfg.memory_shape]
    lines = [f"Peak memory of an optimizer step, batch {cfg.memory_batch} x {cfg.memory_seq_len} tokens "
             f"({cfg.memory_batch // 2} pairs for DPO), float32 weights, {cfg.dtype} compute, "
             f"LoRA rank {LORA_RANK} on every projection. {cfg.memory_shape}: measured on {name}; "
             "the others computed from it.", "",
             "| stage | method | grad checkpoint | reference | " + " | ".join(shapes)
             + " | smallest laptop GPU for the largest |",
             "|---|---|---|---|" + "---|" * (len(shapes) + 1)]
    for r in rows:
        activations = r["peak_mb"] - static_mb(cfg.memory_shape, r["lora"], r["reference"])
        gib = [r["peak_mb"] / 1024] + [
            (static_mb(s, r["lora"], r["reference"]) + activations * activation_scale(s)) / 1024
            for s in shapes[1:]]
        fits = next((f"{size} GB" for size in (8, 12, 16, 24) if gib[-1] * 2 ** 30 <= size * 1e9),
                    "none of 8-24 GB")
        lines.append(f"| {r['stage']} | {'LoRA' if r['lora'] else 'full'} | "
                     f"{'yes' if r['grad_checkpoint'] else 'no'} "
                     f"| {r['reference']} | {gib[0]:.2f} GiB | "
                     + " | ".join(f"{g:.2f} GiB (computed)" for g in gib[1:]) + f" | {fits} |")
    return lines


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    device = pick_device(cfg.device)
    if cfg.memory_case:
        print(json.dumps(memory_case(json.loads(cfg.memory_case), device)))
        return 0
    presets = [] if cfg.presets == "none" else cfg.presets.split(",")
    lengths = [int(x) for x in cfg.seq_len.split(",")][:len(presets)]
    if len(presets) != len(lengths):
        raise SystemExit("error: --presets and --seq_len need the same number of entries")
    peak = matmul_peak(device, cfg.dtype)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"matmul peak on {name}, {cfg.dtype}: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for preset, T in zip(presets, lengths):
        rows += bench_preset(cfg, preset, T, device, peak)
    if cfg.vs_transformers:
        rows += bench_vs_transformers(cfg, device, peak)
    lines = [f"Device: {name}, {cfg.dtype}; matmul peak {peak / 1e9:.1f} GFLOP/s (measured by this run); "
             f"batch {cfg.batch_size}; medians of {cfg.steps} steps after {cfg.warmup} warm-up steps."]
    if rows:
        lines += ["", "| preset | T | benchmark | ms | tokens/s | MFU | outside model | peak mem MB |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "speedup" in r:  # a ratio row of --vs_transformers
            lines.append(f"| {r['preset']} | {r['seq_len']} | {r['benchmark']} | {r['speedup']:.2f}x "
                         "| - | - | - | - |")
            continue
        overhead = f"{r['overhead']:.0%}" if "overhead" in r else "-"
        lines.append(f"| {r['preset']} | {r['seq_len']} | {r['benchmark']} | {r['ms']:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {overhead} | {r['peak_mem_mb']:.0f} |")
    if cfg.memory:
        lines += ["", *memory_table(cfg, device, name)]
    if cfg.logps:
        lines += ["", *logps_table(cfg, device, name)]
    if cfg.sharding:
        lines += ["", "Per-GPU memory of the model states in GB, computed (bench.sharded_memory: "
                  "float32 weights, gradients and AdamW moments, 16 bytes a trained parameter (PPO "
                  "trains policy and critic), a bfloat16 frozen model 2 (DPO's reference; PPO's "
                  "reference and reward model); DDP's gradient buckets 4 more; FSDP divides by N and "
                  "adds each trained model's root and two blocks unsharded, 6 bytes a parameter; "
                  "activations not included):", "", *sharding_table()]
    if cfg.real_shapes:
        lines += ["", "Real shapes (computed; bf16 is 2 bytes a parameter; full fine-tuning with AdamW is "
                  "bf16 weights and gradients plus two float32 moments, 12 bytes a parameter, and 16 with "
                  "float32 master weights as this project's trainers keep them; activations not included):",
                  "", *real_shape_table(), "", "Each family's smallest model, model states only (computed, "
                  "bench.family_memory_table):", "", *family_memory_table()]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(cfg.json) or ".", exist_ok=True)
    with open(cfg.json, "w") as f:
        json.dump({"device": name, "dtype": cfg.dtype, "matmul_peak_flops": peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
