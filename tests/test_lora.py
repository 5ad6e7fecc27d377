"""LoRA layers and gradient checkpointing, on tiny models: a fresh adapter changes nothing,
adapters act only on their slices, merging equals the unmerged forward, adapters off is the
base model, recomputed activations give the same gradients, and adapters load only onto the
base they were trained on.

    python -m pytest -q tests/test_lora.py
"""
import copy
import shutil

import pytest
import torch

import export
from checkpoint import load_gpt, load_reward_model, trainable_state
from files import DataError
from hf import load_folder, save_folder
from lora import TARGETS, AdaptersOff, LoRALinear, adapters_off, attach_lora, merge_lora
from model import GPT, GPTConfig
from reward_model import RewardModel
from tokenizer import Tokenizer
from train_utils import TrainConfig, lora_record, lora_targets

V = 64
CONFIGS = {
    "gpt": dict(),
    "llama_gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1, intermediate_size=48,
                      tie_embeddings=False),
}


def tiny(kind: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32,
                         **{**CONFIGS[kind], **overrides}))


def randomize_adapters(model):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)


def batch():
    torch.manual_seed(2)
    ids = torch.randint(0, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_fresh_adapter_gives_the_base_models_logits_exactly(kind):
    base = tiny(kind).eval()
    lora = attach_lora(copy.deepcopy(base), rank=4, alpha=8, targets=list(TARGETS)).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(lora(ids, mask), base(ids, mask))


@pytest.mark.parametrize("kind", CONFIGS)
def test_only_adapters_train_and_every_adapter_gets_a_gradient(kind):
    model = attach_lora(tiny(kind), rank=4, alpha=8, targets=list(TARGETS))
    randomize_adapters(model)
    ids, mask = batch()
    model(ids, mask).float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    # q, k, v (and gate, up where there is a gate) each have an adapter of their own
    n_slices = {}
    for n in trainable:
        if ".lora_A." in n:
            module = n.split(".lora_A.")[0]
            n_slices[module] = n_slices.get(module, 0) + 1
    assert n_slices["transformer.h.0.attn.c_attn"] == 3
    assert n_slices["transformer.h.0.mlp.c_fc"] == (2 if kind == "llama_gqa" else 1)


@pytest.mark.parametrize("kind", CONFIGS)
def test_merged_model_equals_the_unmerged_forward_and_a_hand_computed_weight(kind):
    model = attach_lora(tiny(kind), rank=4, alpha=8, targets=list(TARGETS)).eval()
    randomize_adapters(model)
    ids, mask = batch()
    with torch.no_grad():
        unmerged = model(ids, mask)
        # an independent reference: W + (alpha / r) B A per slice, in float64, into a plain copy
        reference = tiny(kind).double().eval()
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                weight = reference.get_parameter(f"{name}.weight")
                for (start, end), A, B in zip(module.slices, module.lora_A, module.lora_B):
                    weight[start:end] += 2.0 * B.double() @ A.double()
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids, mask), unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(reference(ids, mask).float(), unmerged, rtol=0, atol=1e-5)


def test_an_adapter_changes_only_its_own_slice_of_a_fused_projection():
    model = attach_lora(tiny("llama_gqa"), rank=2, alpha=2, targets=["k_proj"])
    randomize_adapters(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(5, 32)
    with torch.no_grad():
        on = layer(x)
        with adapters_off(model):
            off = layer(x)
    q, kv = 32, 16  # n_head * head_dim, n_kv_head * head_dim
    assert torch.equal(on[:, :q], off[:, :q]) and torch.equal(on[:, q + kv:], off[:, q + kv:])
    assert not torch.allclose(on[:, q:q + kv], off[:, q:q + kv])


@pytest.mark.parametrize("kind", CONFIGS)
def test_adapters_off_is_the_base_model_and_switches_back_on(kind):
    base = tiny(kind).eval()
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=8, targets=list(TARGETS))
    randomize_adapters(model)
    model.train()
    ids, mask = batch()
    reference = AdaptersOff(model)
    with torch.no_grad():
        assert torch.equal(reference(ids, mask), base(ids, mask))
        assert model.training  # restored after the reference's forward
        assert not torch.allclose(model.eval()(ids, mask), base(ids, mask))
        prompts = [[5, 6, 7], [8, 9]]
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert torch.equal(reference.generate(prompts, 6, [3], 0, generator=g())[0],
                           base.generate(prompts, 6, [3], 0, generator=g())[0])


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, lora):
    def grads(recompute: bool):
        model = tiny(kind, dropout=0.1)  # dropout: the recomputation must replay the same masks
        if lora:
            attach_lora(model, rank=4, alpha=8, targets=list(TARGETS))
            randomize_adapters(model)
        model.grad_checkpoint = recompute
        ids, mask = batch()
        torch.manual_seed(3)
        loss = model(ids, mask).float().logsumexp(-1).mean()
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, plain = grads(False)
    loss_ckpt, recomputed = grads(True)
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA target 'qproj'"):
        attach_lora(tiny("gpt"), rank=2, alpha=2, targets=["qproj"])


@pytest.mark.parametrize("targets", ["q_proj,qkv_proj", "gate_up_proj,up_proj", "qproj"])
def test_overlapping_or_unknown_targets_are_one_line_before_anything_trains(targets):
    from files import DataError
    from train_utils import prepare_trainable
    with pytest.raises(DataError, match=f"--lora_targets {targets}: (two targets adapt part of|unknown)"):
        prepare_trainable(tiny("llama_gqa"), TrainConfig(lora_rank=2, lora_targets=targets))


def base_folder(folder: str, tok: Tokenizer, seed: int) -> None:
    """A tiny Llama-style Hugging Face folder with random weights: a LoRA run's base model."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, **CONFIGS["llama_gqa"])
    save_folder(GPT(config), tok, folder)


@pytest.fixture
def lora_on_a_folder(tmp_path):
    """(LoRA checkpoint, its base folder, the tokenizer, the merged model's logits of a few tokens),
    the checkpoint holding what the training scripts write: adapters, lora_record and the tokenizer."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the movie was great . i loved the cast .\n" * 50)
    tok = Tokenizer.train(str(corpus), vocab_size=300)
    base, ckpt = str(tmp_path / "base"), str(tmp_path / "ckpt.pt")
    base_folder(base, tok, seed=0)
    cfg = TrainConfig(lora_rank=4, lora_alpha=8)
    model = attach_lora(load_gpt(base)[0], cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg))
    randomize_adapters(model)
    torch.save({"model": trainable_state(model), "tokenizer": tok.state(), **lora_record(cfg, base)}, ckpt)
    with torch.no_grad():
        logits = merge_lora(model).eval()(torch.arange(4, 14)[None])
    return ckpt, base, tok, logits


def test_adapters_are_refused_on_changed_base_weights_and_load_on_a_moved_base(lora_on_a_folder, tmp_path):
    ckpt, base, tok, expected = lora_on_a_folder
    ids = torch.arange(4, 14)[None]
    moved = str(tmp_path / "moved")
    shutil.move(base, moved)
    with pytest.raises(DataError, match="which does not exist .give its new place with --lora_base"):
        load_gpt(ckpt)
    with torch.no_grad():  # pointed to its new place, the base gives the same model
        torch.testing.assert_close(load_gpt(ckpt, lora_base=moved)[0].eval()(ids), expected, rtol=0, atol=0)
        assert export.main([f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'hf'}", f"--lora_base={moved}"]) == 0
        torch.testing.assert_close(load_folder(str(tmp_path / "hf"))[0].eval()(ids), expected, rtol=0,
                                   atol=1e-5)
    base_folder(base, tok, seed=1)  # other weights where the base was
    with pytest.raises(DataError) as refused:
        load_gpt(ckpt)
    assert str(refused.value) == (f"{ckpt}: its LoRA adapters were trained on the base model at {base}, "
                                  f"and {base} holds other weights (give the original's place with "
                                  "--lora_base)")
    with pytest.raises(DataError, match=f"and {base} holds other weights"):
        load_gpt(ckpt, lora_base=base)


def test_one_lora_base_serves_a_lora_reward_model_on_a_lora_policy(lora_on_a_folder, tmp_path):
    """PPO's --lora_base reaches its --reward_ckpt too: a LoRA reward model trained on a LoRA SFT
    checkpoint (whose base folder moved) loads through the checkpoint it records, which finds the
    moved folder, and scores as before the move."""
    policy_ckpt, base, tok, _ = lora_on_a_folder
    cfg = TrainConfig(lora_rank=4, lora_alpha=8)
    rm = RewardModel.from_gpt(load_gpt(policy_ckpt)[0])
    attach_lora(rm.backbone, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg))
    randomize_adapters(rm)
    rm_ckpt = str(tmp_path / "rm.pt")
    torch.save({"model": trainable_state(rm), "tokenizer": tok.state(), **lora_record(cfg, policy_ckpt)},
               rm_ckpt)
    ids = torch.arange(4, 14)[None]
    with torch.no_grad():
        expected = merge_lora(rm).eval()(ids, torch.ones_like(ids))
    moved = str(tmp_path / "moved")
    shutil.move(base, moved)
    with pytest.raises(DataError, match="which does not exist"):
        load_reward_model(rm_ckpt)
    with torch.no_grad():
        torch.testing.assert_close(
            load_reward_model(rm_ckpt, lora_base=moved)[0].eval()(ids, torch.ones_like(ids)), expected,
            rtol=0, atol=0)


def test_a_lora_checkpoint_without_a_base_fingerprint_loads_with_a_warning(lora_on_a_folder, capsys):
    """Checkpoints written before the fingerprint: trusted, with a warning naming the base."""
    ckpt, base, _, expected = lora_on_a_folder
    old = torch.load(ckpt, weights_only=True)
    del old["lora"]["fingerprint"]
    torch.save(old, ckpt)
    with torch.no_grad():
        torch.testing.assert_close(load_gpt(ckpt)[0].eval()(torch.arange(4, 14)[None]), expected, rtol=0,
                                   atol=0)
    assert (f"warning: {ckpt} records no fingerprint of its LoRA base; assuming {base} holds"
            in capsys.readouterr().err)
