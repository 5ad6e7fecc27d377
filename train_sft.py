"""
Supervised fine-tuning: next-token loss on completions (or on whole texts), the first stage of
the pipeline and the reference model of every later one.

    python train_sft.py                                  # the toy task, tiny model, CPU
    torchrun --nproc_per_node 2 train_sft.py             # the same run on 2 processes
    python train_sft.py --train_file my.jsonl --preset small --device cuda --dtype bfloat16
"""
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from data import (IGNORE_INDEX, Tokenizer, gold_reward, load_prompts, load_sft,
                  prepare_toy_data, take, tokenize_sft)
from evaluate import sample_completions, sample_metrics
from train_utils import (Dist, Run, TrainConfig, all_reduce_sum, barrier, build_gpt,
                         fit, load_gpt, make_optimizer, run_script, seed_everything)


@dataclass
class Config(TrainConfig):
    out_dir: str = "out/sft"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    # data
    data_dir: str = "data/toy"
    """the toy task's folder, written on first use (ignored with --train_file)"""
    train_file: str = ""
    """your own SFT JSONL, {"prompt","completion"} or {"text"} records; empty: the toy task"""
    val_file: str = ""
    """held-out JSONL; empty with --train_file: the last 5% of the training records"""
    format: Literal["auto", "prompt_completion", "text"] = "auto"
    """record format; auto recognises it from the first record"""
    skip_bad: bool = False
    """skip invalid records (and report how many) instead of stopping at the first"""
    tokenizer: str = ""
    """sentencepiece .model; empty: the toy task's, or one trained on --train_file"""
    vocab_size: int = 8000
    """vocabulary cap when a tokenizer is trained on --train_file"""
    max_length: int = 64
    """longest sequence in tokens, prompt and completion together; longer ones are truncated"""
    max_prompt_length: Optional[int] = None
    """longest prompt; a longer one keeps its last tokens. none: prompts are not truncated"""
    # model
    preset: Literal["tiny", "small", "medium", "gpt2"] = "tiny"
    """model size (see model.PRESETS)"""
    init_from: str = ""
    """start from this checkpoint's weights instead of a fresh model"""
    dropout: float = 0.0
    """dropout probability"""
    # evaluation
    eval_samples: int = 128
    """held-out prompts sampled at each evaluation (toy task: gold reward, well-formedness)"""
    max_new_tokens: int = 40
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature; 0 is greedy"""


def sft_loss(model, batch):
    """Summed next-token cross-entropy over labelled tokens: the logits at t predict the token
    at t + 1, and prompt and pad labels are IGNORE_INDEX."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, {}


def n_labels(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def load_data(cfg: Config, dist: Dist, tok: Tokenizer | None):
    """Tokenised examples, held-out prompts and the tokenizer: `tok` if a checkpoint fixes it,
    else --tokenizer, else the toy task's or one trained on --train_file. Raises DataError on bad
    input, before anything is written."""
    if cfg.train_file:
        examples = load_sft(cfg.train_file, cfg.format, cfg.skip_bad)
        if cfg.val_file:
            val = load_sft(cfg.val_file, cfg.format, cfg.skip_bad)
        else:
            n_val = max(1, len(examples) // 20)
            examples, val = examples[:-n_val], examples[-n_val:]
        prompts = [e.prompt for e in val if e.prompt]
    else:
        if dist.master:
            prepare_toy_data(cfg.data_dir)
        barrier(dist)
        examples = load_sft(os.path.join(cfg.data_dir, "sft_train.jsonl"))
        val = load_sft(os.path.join(cfg.data_dir, "sft_val.jsonl"))
        prompts = load_prompts(os.path.join(cfg.data_dir, "prompts_val.jsonl"))
    if tok is None and cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif tok is None and cfg.train_file:
        tok = train_tokenizer_on(examples, cfg.vocab_size)
    elif tok is None:
        tok = Tokenizer.load(os.path.join(cfg.data_dir, "tokenizer.model"))
    train = tokenize_sft(examples, tok, cfg.max_length, cfg.max_prompt_length)
    val = tokenize_sft(val, tok, cfg.max_length, cfg.max_prompt_length)
    return train, val, prompts[:cfg.eval_samples], tok


def train_tokenizer_on(examples, vocab_size: int) -> Tokenizer:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for e in examples:
            f.write(f"{e.prompt} {e.completion}".replace("\n", " ") + "\n")
    try:
        return Tokenizer.train(f.name, vocab_size)
    finally:
        os.remove(f.name)


@torch.no_grad()
def heldout_loss(model, val, cfg: Config, dist: Dist, ctx) -> float:
    """Mean next-token loss over the whole validation set, sharded over ranks."""
    sums = torch.zeros(2, device=dist.device)  # loss sum, label count
    for idx in torch.arange(len(val["input_ids"]))[dist.rank::dist.world_size].split(cfg.batch_size):
        batch = {k: v.to(dist.device) for k, v in take(val, idx).items()}
        with ctx:
            loss_sum, _ = sft_loss(model, batch)
        sums += torch.stack([loss_sum.float(), torch.tensor(float(n_labels(batch["labels"])), device=dist.device)])
    sums = all_reduce_sum(sums, dist)
    return (sums[0] / sums[1]).item()


def train(cfg: Config, dist: Dist) -> dict:
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist)
    raw_model, tok = load_gpt(cfg.init_from)[:2] if cfg.init_from else (None, None)
    if run.resumed:
        tok = Tokenizer(run.resumed["tokenizer"])
    train_data, val_data, prompts, tok = load_data(cfg, dist, tok)
    toy = not cfg.train_file

    if raw_model is None:
        raw_model = build_gpt(cfg.preset, tok.vocab_size, cfg.dropout)
    if raw_model.config.block_size < cfg.max_length + cfg.max_new_tokens:
        raise SystemExit(f"error: max_length + max_new_tokens exceeds the model's block_size "
                         f"{raw_model.config.block_size}")
    raw_model.to(dist.device)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    if dist.master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {len(train_data['input_ids'])} "
              f"training sequences, {dist.world_size} process(es) on {dist.device}")

    def evaluate(model, ctx):
        """Held-out loss; on rank 0, samples for held-out prompts (gold reward on the toy task)."""
        model.eval()
        metrics, lines = {"eval/loss": heldout_loss(model, val_data, cfg, dist, ctx)}, []
        if dist.master and prompts:
            with ctx:
                _, texts, ended = sample_completions(raw_model, tok, prompts, cfg.max_new_tokens,
                                                     cfg.temperature, cfg.seed)
            if toy:
                metrics.update(sample_metrics(prompts, texts, ended))
            else:
                metrics["eval/eos_rate"] = statistics.fmean(ended)
            lines = [f"[{p}] {t}" + (f"   (gold reward {gold_reward(t, p):.2f})" if toy else "")
                     for p, t in list(zip(prompts, texts))[:cfg.print_samples]]
        model.train()
        return metrics, lines

    return fit(cfg, dist, run, raw_model, optimizer, tok, train_data, sft_loss,
               lambda data, idx: n_labels(data["labels"][idx]), evaluate, "sft")


def main(argv=None) -> int:
    return run_script(Config, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
