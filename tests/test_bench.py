"""bench.py at a tiny size: the table has every benchmark and every figure is finite and positive.

    python -m pytest -q tests/test_bench.py
"""
import json
import math

import bench

BENCHMARKS = ["sft step", "dpo step, live reference", "dpo step, precomputed ref", "reward model step",
              "ppo update (policy+critic)", "generate 32 tokens, KV cache", "generate 32 tokens, no cache",
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
    assert 0 <= result["rows"][0]["overhead"] < 1
    table = capsys.readouterr().out
    assert table.count("| tiny | 16 |") == len(BENCHMARKS)
