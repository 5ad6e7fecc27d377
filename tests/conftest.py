"""Shared fixtures and helpers. Run the suite from the repository root: python -m pytest -q"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# transformers, the tests' reference, reads only the folders the tests write
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, ROOT)

from data import Pair, tokenize_pairs  # noqa: E402
from distributed import Dist  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from toy import ToyConfig, prepare_toy_data  # noqa: E402

CPU = Dist(False, 0, 0, 1, torch.device("cpu"))  # one process on the CPU: from conftest import CPU


def read_metrics(out_dir):
    """A run's metrics.jsonl as a list of dicts."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_python(*args, env=None):
    """python ARGS from the repository root, as a user would type it; OMP_NUM_THREADS=1 under torchrun."""
    if args[:2] == ("-m", "torch.distributed.run"):
        env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def run_ranks(nproc: int, *args, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """What `torchrun --standalone --nproc_per_node NPROC ARGS` runs, without its launcher: NPROC
    processes of python ARGS, each with the environment torchrun gives it (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1); when one fails the others are
    stopped, as torchrun stops them. The launcher's own start and shutdown took about 3 s here, a
    tenth of the multi-process tests' time; tests/test_your_model.py and the memory test in
    tests/test_parallel.py keep the real torchrun. Returns the ranks' output, rank by rank, and
    the exit status of the first rank to fail (else 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**(env or os.environ), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for rank in range(nproc):
            out, err = (open(os.path.join(logs, f"{rank}.{k}"), "w+") for k in ("out", "err"))
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=err,
                                          text=True,
                                          env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        deadline, failed = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            failed = failed or next((p.returncode for p in procs if p.poll()), None)
            if failed or time.monotonic() > deadline:  # a rank failed or hung: stop the rest
                for p in procs:
                    p.kill()
            time.sleep(0.05)
        texts = []
        for out, err in files:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    code = failed or next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The default toy task (seed 0), written once per test session."""
    path = str(tmp_path_factory.mktemp("toy"))
    prepare_toy_data(path, ToyConfig(), verbose=False)
    return path


@pytest.fixture(scope="session")
def sft_pairs(toy_dir, tmp_path_factory):
    """A short SFT run (150 steps) and preference pairs sampled from it: 500 training prompts
    and 128 held-out prompts, K=4. Returns (sft checkpoint path, pairs folder)."""
    import sample
    import train_sft
    root = tmp_path_factory.mktemp("pipeline")
    sft_dir, pairs_dir = str(root / "sft"), str(root / "pairs")
    assert train_sft.main([f"--data_dir={toy_dir}", f"--out_dir={sft_dir}", "--device=cpu", "--max_iters=150",
                           "--eval_interval=150", "--eval_samples=0", "--print_samples=0"]) == 0
    ckpt = os.path.join(sft_dir, "ckpt.pt")
    assert sample.main([f"--ckpt={ckpt}", "--pairs", f"--data_dir={toy_dir}", f"--out_dir={pairs_dir}",
                        "--n_train_prompts=500", "--n_val_prompts=128", "--device=cpu"]) == 0
    return ckpt, pairs_dir


@pytest.fixture(scope="session")
def toy_study(toy_dir, tmp_path_factory):
    """The toy study at --budget tiny, one seed, every stage's TensorBoard events written too.
    Returns (its out_dir, its arguments without --report_to)."""
    import compare
    out = str(tmp_path_factory.mktemp("toy_study") / "study")
    args = ["--budget=tiny", f"--out_dir={out}", f"--data_dir={toy_dir}", "--device=cpu", "--eval_samples=32",
            "--bon_max=4", "--ceiling_prompts=8", "--ceiling_samples=32", "--ceiling_check_samples=18"]
    assert compare.main(args + ["--report_to=tensorboard"]) == 0
    return out, args


@pytest.fixture(scope="module")
def tok(toy_dir):
    """The toy task's tokenizer."""
    return Tokenizer.load(os.path.join(toy_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def model():
    """A random tiny GPT over the toy vocabulary (seed 0), in eval mode."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def pair_batch(toy_dir):
    """Three toy preference pairs, tokenized and collated, and the tokenizer."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    pairs = [Pair("the movie", "was great .", "was dull . i hated the plot .", "t:1"),
             Pair("i loved the film . the plot", "was not bad .", "was awful .", "t:2"),
             Pair("i", "saw the cast .", "would not recommend it .", "t:3")]
    return tokenize_pairs(pairs, tok, 64, None), tok


@pytest.fixture(scope="module")
def tiny_gpt():
    """The same random tiny GPT as `model` (seed 0), in eval mode."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
