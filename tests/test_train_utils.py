"""The shared plumbing against hand-computed values: the learning-rate schedule, which parameters
the optimizer decays, one optimizer step (loss normalisation, accumulation, gradient clipping,
the NaN guard), the data order and held-out sharding.

    python -m pytest -q tests/test_train_utils.py
"""
import math
import os
import re
from contextlib import contextmanager, nullcontext
from importlib.metadata import version

import pytest
import torch

from checkpoint import NonFiniteLoss
from conftest import CPU
from distributed import Dist
from model import GPT, GPTConfig
from train_utils import (TrainConfig, add_sums, batch_means, check_weights, clip_grad_norm, global_batch, gradient_sync,
                         lr_at, make_optimizer, micro_batches, set_lr, shard_indices)


def test_lr_schedule_at_its_corners():
    """Warmup 10 steps to lr 1.0, cosine down to 0.1 at step 110."""
    at = lambda step: lr_at(step, lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    assert at(0) == pytest.approx(0.1)  # the first step already moves: lr * 1 / warmup
    assert at(4) == pytest.approx(0.5)
    assert at(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert at(10) == pytest.approx(1.0)  # the decay starts at the peak
    assert at(60) == pytest.approx(0.55)  # halfway: min + (lr - min) / 2
    assert at(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # a quarter of the way: 0.868
    assert at(110) == pytest.approx(0.1)
    assert at(500) == pytest.approx(0.1)  # past the decay: min_lr, not a rising cosine


def test_set_lr_sets_every_group_and_defaults_the_decay_to_max_iters():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    opt = make_optimizer(model, 1.0, 0.1, (0.9, 0.95), torch.device("cpu"))
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert set_lr(opt, 60, cfg) == pytest.approx(0.55)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.55)] * 2


def test_weight_decay_applies_to_matrices_only():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True))
    decayed, plain = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    # by name, not by shape: linear and embedding weights decay; biases and LayerNorm gains do not
    assert sorted(names[id(p)] for p in decayed["params"]) == sorted(
        n for n, _ in model.named_parameters() if n.endswith("weight") and ".ln_" not in n and "ln_f" not in n)
    assert sorted(names[id(p)] for p in plain["params"]) == sorted(
        n for n, _ in model.named_parameters() if n.endswith("bias") or ".ln_" in n or "ln_f" in n)


def linear_loss(model, batch):
    """sum_i w . x_i: the gradient is the sum of the batch's x, known by hand."""
    return (batch["x"] @ model.weight.squeeze(0)).sum(), {"count": torch.tensor(float(len(batch["x"])))}


def one_step(batches, n_global, grad_clip, step=1):
    """A step as the train_X.py loops take it: each micro-batch's backward, then the means, the
    clipped norm, optimizer.step() and zero_grad."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sums = {}
    for i, batch in enumerate(batches):
        with gradient_sync(model, CPU, sync=i == len(batches) - 1):
            loss_sum, metric_sums = linear_loss(model, batch)
            (loss_sum * (CPU.world_size / n_global)).backward()
        sums = add_sums(sums, loss_sum, metric_sums)
    stats = batch_means(sums, n_global, CPU, step)
    stats["grad_norm"] = clip_grad_norm(model, grad_clip, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    check_weights(model, CPU, step)
    return model.weight.detach().squeeze(0).tolist(), stats


def test_the_gradient_is_the_mean_over_the_global_batch_and_accumulates():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-1.0, 2.0]])
    # mean gradient (1, 2), so SGD at lr 1 from zero lands on (-1, -2); norm sqrt(5) is under the clip
    whole, stats = one_step([{"x": x}], 3, grad_clip=10.0)
    split, split_stats = one_step([{"x": x[:1]}, {"x": x[1:]}], 3, grad_clip=10.0)
    assert whole == pytest.approx([-1.0, -2.0]) and split == pytest.approx([-1.0, -2.0])
    assert stats["grad_norm"] == pytest.approx(math.sqrt(5))
    assert stats["loss"] == pytest.approx(0.0) and stats["count"] == pytest.approx(1.0)  # sums / n_global
    assert split_stats == pytest.approx(stats)


def test_gradient_clipping_rescales_to_the_clip_norm_and_reports_the_norm_before():
    x = torch.tensor([[3.0, 4.0]])  # gradient (3, 4), norm 5
    weights, stats = one_step([{"x": x}], 1, grad_clip=1.0)
    assert weights == pytest.approx([-0.6, -0.8])
    assert stats["grad_norm"] == pytest.approx(5.0)
    unclipped, _ = one_step([{"x": x}], 1, grad_clip=10.0)
    assert unclipped == pytest.approx([-3.0, -4.0])


def test_a_nan_loss_raises_before_the_weights_move():
    """batch_means comes before optimizer.step() in every loop: it raises, the step never runs."""
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    loss_sum, metric_sums = linear_loss(model, {"x": torch.tensor([[float("nan"), 1.0]])})
    loss_sum.backward()
    with pytest.raises(NonFiniteLoss, match="step 7: loss is nan"):
        batch_means(add_sums({}, loss_sum, metric_sums), 1, CPU, step=7)
    assert torch.equal(model.weight, before)


def test_an_infinite_gradient_norm_and_an_update_to_infinite_weights_stop_the_run():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    (model.weight * torch.tensor([[float("inf"), 1.0]])).sum().backward()  # a finite loss can overflow a gradient
    with pytest.raises(NonFiniteLoss, match="step 3: gradient norm is inf"):
        clip_grad_norm(model, 1.0, step=3)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match="step 4: the update made weights NaN or infinite"):
        check_weights(model, CPU, step=4)


def test_gradient_sync_defers_the_ddp_reduction_to_the_last_micro_batch_only_under_ddp():
    class Replica(torch.nn.Linear):
        """Records whether each micro-batch ran under DDP's no_sync."""
        def __init__(self):
            super().__init__(2, 1)
            self.deferred = []

        @contextmanager
        def no_sync(self):
            self.deferred.append(True)
            yield

    ddp, model = Dist(True, 0, 0, 2, torch.device("cpu")), Replica()
    for i in range(3):
        with gradient_sync(model, ddp, sync=i == 2):
            model.deferred.append(False)
    assert model.deferred == [True, False, True, False, False]  # no_sync around the first two, not the last
    one = Replica()
    with gradient_sync(one, CPU, sync=False):  # one process: nothing to reduce, no no_sync
        pass
    assert one.deferred == []


def test_the_loss_sums_of_micro_batches_add_by_name_and_detached():
    w = torch.ones(2, requires_grad=True)
    sums = add_sums({}, (w * 2).sum(), {"n": torch.tensor(1)})
    sums = add_sums(sums, (w * 3).sum(), {"n": torch.tensor(2)})
    assert list(sums) == ["loss", "n"] and sums["loss"].item() == 10.0 and sums["n"].item() == 3.0
    assert not sums["loss"].requires_grad and sums["n"].dtype == torch.float32


def test_data_order_is_a_fresh_permutation_each_epoch_and_a_function_of_the_step():
    n, bs = 10, 3  # 3 steps an epoch, the remainder (one example) dropped
    epoch0 = torch.cat([global_batch(n, bs, s, seed=5) for s in range(3)])
    epoch1 = torch.cat([global_batch(n, bs, s, seed=5) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(global_batch(n, bs, 4, seed=5), epoch1[3:6])  # the same batch whenever it is asked for
    with pytest.raises(SystemExit, match="exceeds"):
        global_batch(2, 3, 0, seed=5)


def test_micro_batches_and_held_out_shards_cover_every_row_once():
    ranks = [Dist(True, r, r, 2, torch.device("cpu")) for r in range(2)]
    indices = torch.arange(12)
    parts = [micro_batches(indices, d, grad_accum=3) for d in ranks]
    assert all(len(p) == 3 and all(len(m) == 2 for m in p) for p in parts)
    assert sorted(torch.cat([m for p in parts for m in p]).tolist()) == list(range(12))
    shards = [shard_indices(7, d, batch_size=2) for d in ranks]
    assert [t.tolist() for t in shards[0]] == [[0, 2], [4, 6]] and [t.tolist() for t in shards[1]] == [[1, 3], [5]]
    with pytest.raises(SystemExit, match="not divisible"):
        micro_batches(torch.arange(10), ranks[0], grad_accum=3)


def test_sharded_held_out_batches_are_padded_with_empty_ones_so_every_rank_runs_as_many_forwards():
    """Under FSDP a forward is collective: a rank with fewer rows must still run each one."""
    ranks = [Dist(True, r, r, 2, torch.device("cpu"), sharded=True) for r in range(2)]
    for n, batch_size in [(7, 2), (5, 1), (1, 4)]:
        shards = [shard_indices(n, d, batch_size) for d in ranks]
        assert len(shards[0]) == len(shards[1]) == math.ceil(math.ceil(n / 2) / batch_size)
        assert sorted(torch.cat([b for s in shards for b in s]).tolist()) == list(range(n))  # every row once
    assert [t.tolist() for t in shard_indices(5, ranks[1], 1)] == [[1], [3], []]


def test_the_empty_padding_batch_of_a_sharded_held_out_set_runs_through_every_scripts_loss():
    """129 held-out pairs, batch 64, 2 ranks: rank 1's third batch is empty; `take` crashed on it
    (max of an empty tensor) in every held-out evaluation and in DPO's reference precompute."""
    import train_dpo
    import train_rm
    import train_sft
    from data import collate, take
    from reward_model import RewardModel
    rank1 = Dist(True, 1, 1, 2, torch.device("cpu"), sharded=True)
    batches = shard_indices(129, rank1, 64)
    assert [len(b) for b in batches] == [64, 0]
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    rows = collate([([1, 2, 3], 1), ([4, 5], 1)], pad_id=0)
    pairs = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in rows.items()}
    empty = torch.arange(0)
    loss, _ = train_sft.sft_loss(gpt, take(rows, empty))
    assert loss.item() == 0
    dpo_cfg = train_dpo.Config(precompute_ref=False)
    loss, metrics = train_dpo.dpo_batch_loss(gpt, take(pairs, empty), gpt, dpo_cfg)
    assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())
    assert train_dpo.reference_logps(gpt, pairs, CPU, nullcontext(), batch_size=1).shape == (2, 2)
    loss, metrics = train_rm.rm_batch_loss(RewardModel.from_gpt(gpt), take(pairs, empty), train_rm.Config())
    assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())


def test_installed_packages_meet_the_floors_in_requirements_txt():
    """torch 2.6 made FSDP2 public (torch.distributed.fsdp.fully_shard); jinja2 3.1.6 closed the last
    known ways out of the sandbox that a folder's chat template runs in."""
    def as_tuple(v):
        return tuple(int(re.match(r"\d*", part).group() or 0) for part in v.split("+")[0].split(".")[:3])

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")) as f:
        floors = dict(line.split("#")[0].strip().split(">=") for line in f if ">=" in line.split("#")[0])
    assert as_tuple(floors["torch"]) >= (2, 6) and as_tuple(floors["jinja2"]) >= (3, 1, 6)
    for name, floor in floors.items():
        assert as_tuple(version(name)) >= as_tuple(floor), f"{name} {version(name)} < {floor}"
