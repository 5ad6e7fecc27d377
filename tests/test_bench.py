"""bench.py at a tiny size: the table has every benchmark and every figure is finite and positive.

    python -m pytest -q tests/test_bench.py
"""
import json
import math

import bench

BENCHMARKS = ["sft step", "dpo step, live reference", "dpo step, precomputed ref", "reward model step",
              "ppo minibatch step (policy+critic)", "ppo step, ragged rollout, padded",
              "ppo step, ragged rollout, packed",
              "generate 32 tokens, KV cache", "generate 32 tokens, no cache",
              "generate 128 tokens, KV cache", "generate 128 tokens, no cache"]


def test_bench_smoke_table_is_complete_and_finite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--presets=tiny", "--seq_len=16", "--batch_size=2", "--steps=1", "--warmup=1",
                       "--gen_batch=2", "--device=cpu", f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["matmul_peak_flops"] > 0
    assert [r["benchmark"] for r in result["rows"]] == BENCHMARKS
    for r in result["rows"]:
        for key in ("ms", "tokens_per_s", "mfu", "peak_mem_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["benchmark"], key)
    with_overhead = [r["benchmark"] for r in result["rows"] if "overhead" in r]
    assert with_overhead == ["sft step", "dpo step, live reference", "dpo step, precomputed ref",
                             "ppo minibatch step (policy+critic)"]
    assert all(0 <= r["overhead"] < 1 for r in result["rows"] if "overhead" in r)
    table = capsys.readouterr().out
    assert table.count("| tiny | 16 |") == len(BENCHMARKS)


def test_dtype_handling_of_the_gpu_path_on_cpu(toy_dir, tmp_path):
    """float32 means no autocast at all; bfloat16 autocasts matmuls but keeps float32 master
    weights and checkpoints, trains with a finite loss, and generation fills a bfloat16 KV cache."""
    import torch

    import train_sft
    from model import GPT, GPTConfig, KVCache
    from checkpoint import load_checkpoint
    from train_utils import autocast

    with autocast(torch.device("cpu"), "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    out = str(tmp_path / "bf16")
    assert train_sft.main([f"--data_dir={toy_dir}", f"--out_dir={out}", "--device=cpu", "--dtype=bfloat16",
                           "--max_iters=3", "--batch_size=8", "--eval_interval=3", "--eval_samples=4",
                           "--print_samples=0", "--log_interval=1"]) == 0
    ckpt = load_checkpoint(f"{out}/ckpt.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    with open(f"{out}/metrics.jsonl") as f:
        assert all(math.isfinite(json.loads(line).get("loss", 0.0)) for line in f)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    cache = KVCache(model.config, 1, 8)
    with torch.no_grad(), autocast(torch.device("cpu"), "bfloat16"):
        model(torch.tensor([[2, 5, 6]]), kv_cache=cache)
    assert cache.k.dtype == torch.bfloat16


def test_sharded_memory_of_tinyllama_matches_the_hand_arithmetic():
    """TinyLlama-1.1B: 22 blocks of 44,044,288 parameters (q and o 2048 x 2048, k and v 2048 x 256,
    three MLP matrices 2048 x 5632, two norms) and a root of 131,074,048 (embedding and head
    32000 x 2048, final norm): 1,100,048,384 in all."""
    n, block, root = 1_100_048_384, 44_044_288, 131_074_048
    assert 22 * block + root == n
    # 16 trained + 2 reference bytes, sharded 4 ways; 3 units unsharded
    dpo_fsdp_4 = 18 * n / 4 + 6 * (root + 2 * block)
    assert bench.sharded_memory(n, block, root, 4, "fsdp", trained=1, frozen=1) == dpo_fsdp_4
    # PPO: policy and critic train (2 x 16), reference and reward model frozen (2 x 2); both roots gathered
    assert (bench.sharded_memory(n, block, root, 8, "fsdp", trained=2, frozen=2)
            == 36 * n / 8 + 6 * (2 * root + 2 * block))
    assert bench.sharded_memory(n, block, root, 8, "ddp", trained=2, frozen=2) == (36 + 8) * n
    assert bench.sharded_memory(n, block, root, 8, "ddp") == 20 * n  # replicated, buckets included
    assert bench.sharded_memory(n, block, root, 1, "ddp") == 16 * n  # one process: no buckets
    row = next(line for line in bench.sharding_table()
               if line.startswith("| TinyLlama-1.1B (1.10B) | DPO | fsdp |"))
    assert row.split(" | ")[5] == f"{dpo_fsdp_4 / 1e9:.1f}"  # the N=4 column
