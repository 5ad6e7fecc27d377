"""Run a training script as torchrun's entry point, then print this process's peak resident
memory, one line per process: "peak_rss_mib RANK MiB". For tests/test_parallel.py:

    torchrun --nproc_per_node 2 tests/peak_memory.py train_sft.py --parallel fsdp ...
"""
import os
import resource
import runpy
import sys

script = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.dirname(script))  # the project's modules, as when the script runs itself
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit_:
    if exit_.code not in (0, None):
        raise
print(f"peak_rss_mib {os.environ.get('RANK', '0')} "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)
