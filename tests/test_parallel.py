"""Data parallelism on CPU with gloo, the processes started as torchrun starts them
(conftest.run_ranks; the memory test runs torchrun itself): 2 DDP processes and 2 FSDP2 processes
(--parallel fsdp) train the same weights as 1 process (SFT, DPO, reward model), with gradient
accumulation and a clip that binds; an FSDP checkpoint holds whole tensors, loads in one
process, and resumes under FSDP with any number of processes (or in one process) to the
uninterrupted run; and each FSDP process holds less memory than a DDP one.

    python -m pytest -q tests/test_parallel.py
"""
import os
import re

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from checkpoint import load_checkpoint
from conftest import read_metrics, run_python, run_ranks
from distributed import Dist, cleanup_distributed, shard
from hf import load_folder
from model import GPT, GPTConfig
from tokenizer import Tokenizer

pytestmark = pytest.mark.slow
TORCHRUN = ("-m", "torch.distributed.run", "--standalone")


def launch(script, args, nproc=0, parallel="ddp"):
    """python SCRIPT (nproc 0) or nproc processes as torchrun starts them; fails the test on an error."""
    argv = (script, *args, f"--parallel={parallel}")
    r = run_ranks(nproc, *argv) if nproc else run_python(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def flags(**kwargs):
    return [f"--{k}={v}" for k, v in kwargs.items()]


def sft_args(toy_dir, out_dir, **overrides):
    # grad_clip 0.05 binds at every step (the norm starts near 1), so the clip's global norm over shards is
    # tested
    return flags(**{**dict(data_dir=toy_dir, out_dir=out_dir, device="cpu", batch_size=16, max_iters=3,
                           grad_clip=0.05, eval_interval=3, eval_samples=6, print_samples=0,
                           log_interval=1), **overrides})


def pair_args(sft_pairs, toy_dir, out_dir, **overrides):
    ckpt, pairs = sft_pairs
    return flags(**{**dict(sft_ckpt=ckpt, train_file=f"{pairs}/pairs_train.jsonl",
                           val_file=f"{pairs}/pairs_val.jsonl",
                           out_dir=out_dir, device="cpu", batch_size=16, max_iters=3, grad_clip=0.05,
                           eval_interval=3, print_samples=0, log_interval=1), **overrides})


def assert_same_run(a, b, atol=1e-5):
    """Equal final weights and equal logged metrics (every step's loss, grad_norm, evaluations)."""
    x, y = load_checkpoint(os.path.join(a, "ckpt.pt")), load_checkpoint(os.path.join(b, "ckpt.pt"))
    assert x["model"].keys() == y["model"].keys()
    for name, tensor in x["model"].items():
        torch.testing.assert_close(y["model"][name], tensor, rtol=0, atol=atol, msg=name)
    for m, n in zip(read_metrics(a), read_metrics(b), strict=True):
        assert m.keys() == n.keys()
        for k in m:
            if not k.endswith("accuracies"):  # a pair whose margin is ~0 may flip by rounding
                assert m[k] == pytest.approx(n[k], abs=atol), k


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py", "train_rm.py"])
def test_two_fsdp_processes_train_the_weights_of_one_process_and_of_two_ddp_processes(script, toy_dir,
                                                                                      sft_pairs, tmp_path):
    """The global batch of 16 in 4 micro-batches: 1 process x grad_accum 4, 2 DDP processes x 2,
    2 FSDP processes x 2 (the first micro-batch's gradients kept unsharded, reduced with the
    second's). DPO's frozen reference is sharded too, and evaluations sample on the sharded policy."""
    if script == "train_sft.py":
        args = lambda out, **kw: sft_args(toy_dir, out, **kw)
    else:
        extra = (dict(eval_prompts=f"{toy_dir}/prompts_val.jsonl", eval_samples=6)
                 if script == "train_dpo.py" else {})
        args = lambda out, **kw: pair_args(sft_pairs, toy_dir, out, **extra, **kw)
    one, ddp, fsdp = (str(tmp_path / name) for name in ("one", "ddp", "fsdp"))
    launch(script, args(one, grad_accum=4))
    launch(script, args(ddp, grad_accum=2), nproc=2)
    launch(script, args(fsdp, grad_accum=2), nproc=2, parallel="fsdp")
    assert all(m["grad_norm"] > 0.05 for m in read_metrics(one) if "grad_norm" in m)  # the clip binds
    # sampled evaluation
    assert any(k.startswith("eval/") and k != "eval/loss" for k in read_metrics(one)[-1])
    assert_same_run(one, ddp)
    assert_same_run(one, fsdp)


def test_fsdp_checkpoint_loads_in_one_process_and_resumes_under_any_world_size(toy_dir, tmp_path):
    """SFT for 4 steps under FSDP with 2 processes, its checkpoint exported to a Hugging Face
    folder, against the same run stopped at step 2 and resumed: under FSDP with 2 processes, under
    DDP with 2, and in one plain process. Each resumed run's weights and metrics equal the
    uninterrupted one's."""
    whole = str(tmp_path / "whole")
    common = dict(eval_interval=2, lr_decay_iters=4, grad_accum=2)
    launch("train_sft.py", sft_args(toy_dir, whole, max_iters=4, **common), nproc=2, parallel="fsdp")
    ckpt = load_checkpoint(os.path.join(whole, "ckpt.pt"))  # weights_only, one process, whole tensors
    assert ckpt["model"]["lm_head.weight"].shape == (ckpt["model_config"]["vocab_size"],
                                                     ckpt["model_config"]["n_embd"])
    folder = str(tmp_path / "hf")
    r = run_python("export.py", f"--ckpt={whole}/ckpt.pt", f"--out_dir={folder}")
    assert r.returncode == 0, r.stderr
    exported = load_folder(folder)[0].state_dict()
    for name, tensor in ckpt["model"].items():
        assert torch.equal(exported[name], tensor), name
    half = str(tmp_path / "half")
    launch("train_sft.py", sft_args(toy_dir, half, max_iters=2, **common), nproc=2, parallel="fsdp")
    for name, nproc, parallel in [("fsdp2", 2, "fsdp"), ("ddp2", 2, "ddp"), ("plain", 0, "ddp")]:
        split = str(tmp_path / name)
        os.makedirs(split)
        for f in ("ckpt.pt", "metrics.jsonl", "config.json"):
            with open(os.path.join(half, f), "rb") as src, open(os.path.join(split, f), "wb") as dst:
                dst.write(src.read())
        launch("train_sft.py", sft_args(toy_dir, split, max_iters=4, resume=True, **common), nproc=nproc,
               parallel=parallel)
        assert_same_run(whole, split)


def test_lora_trains_the_adapters_of_one_process_under_ddp_and_under_fsdp_with_checkpointing(
        toy_dir, sft_pairs, tmp_path):
    """DPO with LoRA adapters, whose reference is the policy with its adapters off: 2 DDP
    processes, and 2 FSDP processes that recompute each block in the backward pass (FSDP gathers
    its weights again), train the adapters of one process that keeps its activations; the
    adapters moved far more than the tolerance."""
    one, ddp, fsdp = (str(tmp_path / name) for name in ("one", "ddp", "fsdp"))
    common = dict(lora_rank=4, lr=2e-3, warmup_iters=1, eval_prompts=f"{toy_dir}/prompts_val.jsonl",
                  eval_samples=6)
    launch("train_dpo.py", pair_args(sft_pairs, toy_dir, one, grad_accum=4, **common))
    launch("train_dpo.py", pair_args(sft_pairs, toy_dir, ddp, grad_accum=2, **common), nproc=2)
    launch("train_dpo.py", pair_args(sft_pairs, toy_dir, fsdp, grad_accum=2, grad_checkpoint=True, **common),
           nproc=2, parallel="fsdp")
    assert_same_run(one, ddp)
    assert_same_run(one, fsdp)
    adapters = load_checkpoint(os.path.join(one, "ckpt.pt"))["model"]
    assert all("lora" in name for name in adapters)
    assert max(t.abs().max().item() for name, t in adapters.items() if "lora_B" in name) > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_two_fsdp_processes_train_todays_families_as_one_process_does(family, toy_dir, tmp_path):
    """A Qwen3 folder (per-head q/k norms) and a Gemma 3 folder (four norms a block, sliding and full
    layers) built by transformers: one SFT step of 2 FSDP processes, recomputing each block in the
    backward pass, trains the weights of one process."""
    from test_hf import FAMILIES, train_bpe_tokenizer_json, write_model
    folder = str(tmp_path / family)
    write_model(folder, FAMILIES[family]())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(toy_dir, "sft_train.jsonl")).read()[:20000])
    train_bpe_tokenizer_json(folder, str(corpus), bos_template=False)
    one, fsdp = str(tmp_path / "one"), str(tmp_path / "fsdp")
    common = flags(init_from=folder, train_file=f"{toy_dir}/sft_val.jsonl", device="cpu", batch_size=8, max_iters=1,
                   max_length=48, max_new_tokens=8, eval_interval=1, eval_samples=0, print_samples=0, log_interval=1,
                   lr=1e-3, warmup_iters=0)
    launch("train_sft.py", [*common, f"--out_dir={one}", "--grad_accum=2"])
    launch("train_sft.py", [*common, f"--out_dir={fsdp}", "--grad_accum=1", "--grad_checkpoint=true"], nproc=2,
           parallel="fsdp")
    assert_same_run(one, fsdp)
    start, trained = load_folder(folder)[0].state_dict(), load_checkpoint(os.path.join(one, "ckpt.pt"))["model"]
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-4  # the step moved the weights


def test_fsdp_holds_less_memory_per_process_than_ddp(toy_dir, tmp_path):
    """Peak resident memory of 2 processes training the "small" preset (10.8M parameters) for 2
    steps in float32 with AdamW: DDP keeps whole weights, gradients and both AdamW moments on
    each process (16 bytes a parameter), FSDP half of each. On rank 1 at least half of that
    saving must show over everything else a process holds (torch, data, activations); rank 0
    also gathers the whole checkpoint to write it, so its peak is not compared. glibc is told to
    return freed blocks (as bench.py --memory does), or its cache of FSDP's gathered weights
    would hide the saving."""
    params = GPT.from_preset("small",
                             Tokenizer.load(f"{toy_dir}/tokenizer.model").vocab_size).num_params(False)
    val_file = tmp_path / "val.jsonl"
    with open(f"{toy_dir}/sft_val.jsonl") as f:
        val_file.write_text("".join(f.readlines()[:8]))  # one held-out batch
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for parallel in ("ddp", "fsdp"):
        args = sft_args(toy_dir, str(tmp_path / parallel), preset="small", val_file=val_file, batch_size=8,
                        max_iters=2, eval_interval=2, eval_samples=0, grad_clip=1.0, parallel=parallel)
        r = run_python(*TORCHRUN, "--nproc_per_node=2", "tests/peak_memory.py", "train_sft.py", *args,
                       env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[parallel] = {int(rank): int(mib)
                           for rank, mib in re.findall(r"peak_rss_mib (\d+) (\d+)", r.stdout)}
    assert set(peaks["ddp"]) == set(peaks["fsdp"]) == {0, 1}
    saving_mib = 16 * params / 2 / 2**20
    assert peaks["fsdp"][1] < peaks["ddp"][1] - saving_mib / 2, (peaks, saving_mib)


def _ids(rank):
    return (torch.arange(24).view(2, 12) * (rank + 1)) % 64  # each rank its own batch


def _shard_in_bfloat16_on_rank(rank, store, out):
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    shard(model, "bfloat16", torch.device("cpu"))
    block = model.transformer.h[0]
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append((module.attn.c_attn.weight.dtype,
                                                                      module.attn.c_attn.weight.shape)))
    logits = model(_ids(rank))
    logits.float().logsumexp(-1).sum().backward()
    weight = block.attn.c_attn.weight
    torch.save({"seen": seen, "logits_dtype": logits.dtype, "local": (weight.dtype, weight.to_local().shape),
                "grad": (weight.grad.dtype, weight.grad.to_local().shape), "logits": logits.detach(),
                "full": {k: v.full_tensor() for k, v in model.state_dict().items()},
                "full_grad": {k: p.grad.full_tensor() for k, p in model.named_parameters()}}, f"{out}.{rank}")
    # as distributed.cleanup_distributed does: every rank done before any closes its connections (once, under
    # a loaded machine, a rank aborted in gloo's threads: "terminate called without an active exception")
    cleanup_distributed(Dist(True, rank, rank, 2, torch.device("cpu")), finished=True)


def test_fsdp_under_bfloat16_computes_in_bfloat16_and_keeps_float32_shards(tmp_path):
    """MixedPrecisionPolicy as --dtype bfloat16 sets it, 2 processes: while a block runs, its
    weights are whole and bfloat16; between runs each process holds half of each weight in
    float32. The forward is the float32 model's weights rounded to bfloat16 and run in bfloat16,
    and the gradient is the mean of the two processes' bfloat16 gradients taken in float32."""
    out = str(tmp_path / "bf16")
    mp.spawn(_shard_in_bfloat16_on_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    runs = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for run in runs:
        assert run["seen"] == [(torch.bfloat16, (96, 32))]
        assert run["logits_dtype"] == torch.bfloat16
        assert run["local"] == (torch.float32, (48, 32)) and run["grad"] == (torch.float32, (48, 32))
    torch.manual_seed(0)
    reference = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    for name, tensor in reference.state_dict().items():
        # float32 master weights, untouched by the casts
        assert torch.equal(runs[0]["full"][name], tensor), name
    reference.to(torch.bfloat16)
    grads = []
    for rank, run in enumerate(runs):
        reference.zero_grad()
        logits = reference(_ids(rank))
        torch.testing.assert_close(run["logits"], logits, rtol=0, atol=0)
        logits.float().logsumexp(-1).sum().backward()
        grads.append({name: p.grad.float() for name, p in reference.named_parameters()})
    for name, grad in runs[0]["full_grad"].items():  # a bfloat16 reduction would round the mean
        torch.testing.assert_close(grad, (grads[0][name] + grads[1][name]) / 2, rtol=0, atol=0, msg=name)
