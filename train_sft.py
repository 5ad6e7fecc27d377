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
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from data import (IGNORE_INDEX, DataError, Tokenizer, gold_reward, is_well_formed, load_prompts,
                  load_sft, prepare_toy_data, take, tokenize_sft)
from train_utils import (Dist, NonFiniteLoss, Run, all_reduce_sum, autocast, barrier, build_gpt,
                         cleanup_distributed, global_batch, load_gpt, lr_at,
                         make_optimizer, micro_batches, parse_config, progress_bar, seed_everything,
                         setup_distributed, train_step, wrap_model)


@dataclass
class Config:
    out_dir: str = "out/sft"
    """folder for config.json, metrics.jsonl and ckpt.pt"""
    resume: bool = False
    """continue the run in out_dir from its checkpoint"""
    overwrite: bool = False
    """replace a run already in out_dir"""
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
    # optimisation
    batch_size: int = 64
    """sequences per optimizer step, over all processes and micro-batches"""
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
    # evaluation and logging
    log_interval: int = 10
    """steps between training-metric lines in metrics.jsonl"""
    eval_interval: int = 250
    """steps between held-out evaluations and checkpoints"""
    eval_samples: int = 128
    """held-out prompts sampled at each evaluation (toy task: gold reward, well-formedness)"""
    max_new_tokens: int = 40
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature; 0 is greedy"""
    print_samples: int = 3
    """samples printed at each evaluation"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda, then mps, then cpu"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 runs under autocast"""
    compile: bool = False
    """torch.compile the model"""
    seed: int = 1337
    """seeds the initialisation, the data order and the samples"""


def sft_loss(model, batch):
    """Summed next-token cross-entropy over labelled tokens: the logits at t predict the token
    at t + 1, and prompt and pad labels are IGNORE_INDEX."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, {}


def n_labels(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sample_completions(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int,
                       temperature: float, seed: int, batch_size: int = 64):
    """Completion texts for `prompts` and whether each ended with eos. A private generator makes
    samples repeatable and leaves the training RNG stream untouched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    texts, ended = [], []
    for i in range(0, len(prompts), batch_size):
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts[i:i + batch_size]]
        out, mask = model.generate(ids, max_new_tokens, tok.eos_id, tok.pad_id,
                                   temperature=temperature, generator=generator)
        for row, m in zip(out.tolist(), mask.sum(1).tolist()):
            texts.append(tok.decode(row[:m]))
            ended.append(row[m - 1] == tok.eos_id)
    return texts, ended


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
def evaluate(model, raw_model, val, prompts, tok, cfg: Config, dist: Dist, ctx, toy: bool):
    """Held-out loss over the whole validation set (sharded over ranks), and on rank 0, samples
    for the held-out prompts: gold reward and well-formedness on the toy task. Returns the
    metrics and the samples' texts."""
    model.eval()
    sums = torch.zeros(2, device=dist.device)  # loss sum, label count
    indices = torch.arange(len(val["input_ids"]))[dist.rank::dist.world_size]
    for idx in indices.split(cfg.batch_size):
        batch = {k: v.to(dist.device) for k, v in take(val, idx).items()}
        with ctx:
            loss_sum, _ = sft_loss(model, batch)
        sums += torch.stack([loss_sum.float(), torch.tensor(float(n_labels(batch["labels"])), device=dist.device)])
    sums = all_reduce_sum(sums, dist)
    metrics, texts = {"eval/loss": (sums[0] / sums[1]).item()}, []
    if dist.master and prompts:
        with ctx:
            texts, ended = sample_completions(raw_model, tok, prompts, cfg.max_new_tokens,
                                              cfg.temperature, cfg.seed)
        metrics["eval/eos_rate"] = sum(ended) / len(ended)
        if toy:
            rewards = [gold_reward(t, p) for p, t in zip(prompts, texts)]
            metrics["eval/gold_reward"] = statistics.fmean(rewards)
            metrics["eval/gold_reward_std"] = statistics.pstdev(rewards)
            metrics["eval/well_formed"] = statistics.fmean(
                e and is_well_formed(f"{p} {t}") for p, t, e in zip(prompts, texts, ended))
    model.train()
    return metrics, texts


def train(cfg: Config, dist: Dist) -> dict:
    t0 = time.time()
    seed_everything(cfg.seed, dist)
    run = Run(cfg, dist)
    raw_model, tok = load_gpt(cfg.init_from)[:2] if cfg.init_from else (None, None)
    if run.resumed:
        tok = Tokenizer(run.resumed["tokenizer"])
    train_data, val_data, prompts, tok = load_data(cfg, dist, tok)

    # 1. model and optimizer; the raw module is what gets saved
    if raw_model is None:
        raw_model = build_gpt(cfg.preset, tok.vocab_size, cfg.dropout)
    if raw_model.config.block_size < cfg.max_length + cfg.max_new_tokens:
        raise SystemExit(f"error: max_length + max_new_tokens exceeds the model's block_size "
                         f"{raw_model.config.block_size}")
    raw_model.to(dist.device)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device)
    step = run.start(raw_model, optimizer)
    model = wrap_model(raw_model, dist, cfg.compile)
    ctx = autocast(dist.device, cfg.dtype)
    toy = not cfg.train_file
    if dist.master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {len(train_data['input_ids'])} "
              f"training sequences, {dist.world_size} process(es) on {dist.device}")

    def eval_and_save(step, metrics):
        eval_metrics, texts = evaluate(model, raw_model, val_data, prompts, tok, cfg, dist, ctx, toy)
        metrics.update(eval_metrics)
        run.log(step, metrics)
        run.save(step, raw_model, optimizer, tok)
        if dist.master:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            for p, t in list(zip(prompts, texts))[:cfg.print_samples]:
                bar.write(f"  [{p}] {t}" + (f"   (gold reward {gold_reward(t, p):.2f})" if toy else ""))
        return metrics

    bar = progress_bar(cfg.max_iters, step, dist, "sft")
    metrics = eval_and_save(0, {}) if step == 0 else {}
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    while step < cfg.max_iters:
        # 2. this step's learning rate and global batch; this rank's micro-batches
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = global_batch(len(train_data["input_ids"]), cfg.batch_size, step, cfg.seed)
        n_tokens = n_labels(train_data["labels"][indices])
        batches = [{k: v.to(dist.device) for k, v in take(train_data, idx).items()}
                   for idx in micro_batches(indices, dist, cfg.grad_accum)]
        # 3. forward, backward, step (gradients are the mean over every labelled token of the global batch)
        try:
            stats = train_step(model, optimizer, batches, sft_loss, n_tokens, cfg.grad_clip, dist, ctx)
        except NonFiniteLoss as e:
            raise SystemExit(f"error: step {step + 1}: {e}; stopped, the last good checkpoint "
                             f"{run.ckpt_path} is kept") from None
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        # 4. log, evaluate, checkpoint
        metrics = {}
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            metrics = {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "learning_rate": lr}
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = eval_and_save(step, metrics)
        elif metrics:
            run.log(step, metrics)
    bar.close()

    if dist.master:
        print(f"done in {time.time() - t0:.0f}s: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                              if k.startswith("eval/")))
    return metrics


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, __doc__)
    dist = setup_distributed(cfg.device)
    try:
        train(cfg, dist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
