"""checkpoint.py's Run: the evaluation schedule, what a checkpoint keeps, resumes and never saves.

    python -m pytest -q tests/test_checkpoint.py
"""
import os

import pytest
import torch

import train_sft
from checkpoint import Run, load_checkpoint, load_optimizer_state, optimizer_state, trainable_state
from conftest import CPU
from distributed import Dist, setup_distributed
from files import DataError
from lora import attach_lora
from model import GPT, GPTConfig
from ppo import PolicyAndCritic
from reward_model import RewardModel
from train_utils import TrainConfig, make_optimizer


def test_evaluation_schedule_is_dense_early_then_every_eval_interval_and_at_the_end(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), max_iters=65, eval_interval=10, early_eval_interval=2, early_eval_until=30)
    run = Run(cfg, CPU)
    assert [s for s in range(66) if run.evaluates(s)] == list(range(0, 30, 2)) + [30, 40, 50, 60, 65]
    cfg.early_eval_interval = 0  # off: early_eval_until alone changes nothing
    assert [s for s in range(66) if run.evaluates(s)] == [0, 10, 20, 30, 40, 50, 60, 65]


class _Tokenizer:
    def state(self):
        return {}


def test_a_checkpoint_before_the_first_step_leaves_the_optimizer_untouched(tmp_path):
    """At step 0 AdamW has no state: the checkpoint holds none, and saving must not make one
    (torch's state-dict helper would, with a dummy step that advances AdamW's step count and so
    changes its first real update)."""
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    run = Run(TrainConfig(out_dir=str(tmp_path)), CPU)
    run.start(model, optimizer)
    run.save(0, model, optimizer, _Tokenizer())
    assert not optimizer.state
    assert load_checkpoint(os.path.join(str(tmp_path), "ckpt.pt"))["optimizer"] is None
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    run.save(1, model, optimizer, _Tokenizer())
    saved = load_checkpoint(os.path.join(str(tmp_path), "ckpt.pt"))["optimizer"]["state"]
    assert all(float(v["step"]) == 1 for v in saved.values())  # keyed by name, one step taken


def test_a_checkpoint_with_the_optimizer_keyed_by_position_resumes_its_state(tmp_path):
    """Checkpoints written before FSDP hold optimizer.state_dict(), keyed by position: resuming
    one restores every parameter's AdamW moments by name, as from today's checkpoints."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    run = Run(TrainConfig(out_dir=str(tmp_path)), CPU)
    run.start(model, optimizer)
    model(torch.arange(4)[None]).square().sum().backward()
    optimizer.step()
    run.save(1, model, optimizer, _Tokenizer())
    path = os.path.join(str(tmp_path), "ckpt.pt")
    ckpt = load_checkpoint(path)
    torch.save({**ckpt, "optimizer": optimizer.state_dict()}, path)  # the old format
    resumed_model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    resumed = make_optimizer(resumed_model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert Run(TrainConfig(out_dir=str(tmp_path), resume=True), CPU).start(resumed_model, resumed) == 1
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key]), key


def _trained(kind: str) -> torch.nn.Module:
    """A model as a training script saves it: one whose every weight trains, one with LoRA
    adapters (the rest frozen), a reward model, PPO's policy and critic as one module."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8, norm="rmsnorm", mlp="swiglu",
                       pos="rope", intermediate_size=12, tie_embeddings=kind != "policy_and_critic")
    if kind == "lora":
        return attach_lora(GPT(config), 2, 2, ["q_proj", "down_proj"])
    if kind == "reward":
        return RewardModel.from_gpt(GPT(config))
    if kind == "policy_and_critic":
        return PolicyAndCritic(GPT(config), RewardModel.from_gpt(GPT(config)))
    return GPT(config)


@pytest.mark.parametrize("kind", ["gpt", "lora", "reward", "policy_and_critic"])
def test_unsharded_states_are_what_torchs_sharded_helpers_give(kind):
    """Unsharded, a checkpoint's model and optimizer states come from state_dict() (torch's state
    dict helpers take a second to import); they hold the same names, tensors and groups as
    get_model_state_dict and get_optimizer_state_dict, which FSDP runs use, so either resumes
    the other; and the optimizer's state loads back into a fresh optimizer whole."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = _trained(kind)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    optimizer.step()
    state, reference = trainable_state(model), get_model_state_dict(model, options=full)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(state) == (set(reference) if kind != "lora" else trained)
    assert all(torch.equal(state[name], reference[name]) for name in state)
    saved, reference = optimizer_state(model, optimizer), get_optimizer_state_dict(model, optimizer, options=full)
    assert saved["param_groups"] == reference["param_groups"]
    assert saved["state"].keys() == reference["state"].keys()
    for name, moments in saved["state"].items():
        assert all(torch.equal(moments[k], reference["state"][name][k]) for k in moments)
    restored = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    load_optimizer_state(model, restored, saved, "test")
    for p in model.parameters():
        assert restored.state[p].keys() == optimizer.state[p].keys()
        assert all(torch.equal(restored.state[p][k], optimizer.state[p][k]) for k in optimizer.state[p])
    assert [{**g, "params": None} for g in restored.param_groups] == [{**g, "params": None} for g in optimizer.param_groups]


def test_an_optimizer_state_of_other_parameters_is_refused():
    """A saved optimizer state whose groups name other parameters than the optimizer's (here
    two groups swapped) is refused, never loaded by position into the wrong weights."""
    model = _trained("gpt")
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    saved = optimizer_state(model, optimizer)
    swapped = {**saved, "param_groups": saved["param_groups"][::-1]}
    with pytest.raises(DataError, match="does not fit"):
        load_optimizer_state(model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu")), swapped, "x")


def test_resume_restores_the_cuda_rng_state_beside_the_cpu_one(tmp_path, monkeypatch):
    """On a GPU the checkpoint keeps the device's generator too (dropout and sampling draw from it);
    a checkpoint holding only the CPU state, as older ones do, still resumes."""
    cuda_state = torch.arange(16, dtype=torch.uint8)  # stands in for torch.cuda.get_rng_state()
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    gpu = Dist(False, 0, 0, 1, torch.device("cuda"))
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    run = Run(TrainConfig(out_dir=str(tmp_path)), gpu)
    run.start(model, optimizer)
    cpu_state = torch.manual_seed(5).get_state()
    run.save(0, model, optimizer, _Tokenizer())
    torch.manual_seed(6)
    Run(TrainConfig(out_dir=str(tmp_path), resume=True), gpu).start(model, optimizer)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == gpu.device
    path = os.path.join(str(tmp_path), "ckpt.pt")
    ckpt = load_checkpoint(path)
    torch.save({**ckpt, "rng": [ckpt["rng"][0]["cpu"]]}, path)  # the older format: a CPU state per rank
    torch.manual_seed(6)
    Run(TrainConfig(out_dir=str(tmp_path), resume=True), gpu).start(model, optimizer)
    assert torch.equal(torch.get_rng_state(), cpu_state) and len(restored) == 1


def test_a_model_with_a_non_finite_weight_is_never_saved(toy_dir, tmp_path):
    from checkpoint import NonFiniteLoss, Run
    from train_utils import make_optimizer
    from tokenizer import Tokenizer
    from model import GPT, GPTConfig
    cfg = train_sft.Config(out_dir=str(tmp_path / "run"))
    dist = setup_distributed("cpu")
    run = Run(cfg, dist)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.95), torch.device("cpu"))
    run.start(model, optimizer)
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    run.save(0, model, optimizer, tok)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match="step 1: the model holds non-finite weights"):
        run.save(1, model, optimizer, tok)
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 0


def test_a_save_that_fails_on_a_full_disk_leaves_the_last_checkpoint_and_no_temporary_file(toy_dir, tmp_path,
                                                                                              monkeypatch):
    """A full disk made torch.save fail half way: ckpt.pt.tmp stayed behind, keeping the disk full."""
    import errno
    import checkpoint
    from checkpoint import Run
    from train_utils import make_optimizer
    from tokenizer import Tokenizer
    from model import GPT, GPTConfig
    run = Run(train_sft.Config(out_dir=str(tmp_path / "run")), setup_distributed("cpu"))
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.95), torch.device("cpu"))
    run.start(model, optimizer)
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    run.save(0, model, optimizer, tok)

    def save_until_the_disk_is_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(checkpoint.RunStopped, match="step 1: writing .*ckpt.pt failed \\(No space left on device\\)"):
        run.save(1, model, optimizer, tok)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 0


def test_console_numbers_keep_small_values_visible(tmp_path, capsys):
    """A learning rate of 5e-7 used to print as 0.0000."""
    metrics = {"learning_rate": 5e-7, "loss": 0.693147, "kl": 0.0, "tokens": 12800, "grad_norm": 12.3456}
    Run(TrainConfig(out_dir=str(tmp_path)), CPU).print(3, metrics)
    assert capsys.readouterr().out == "step 3: learning_rate 5e-07, loss 0.6931, kl 0.0000, tokens 12800, grad_norm 12.3456\n"
