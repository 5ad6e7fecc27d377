"""LoRA adapters as PEFT folders, against peft itself: export.py --adapter writes a LoRA
checkpoint as an adapter folder that PeftModel.from_pretrained makes into the project's merged
model; every place that reads a model reads an adapter folder (export's, or one peft wrote) as its
base with the adapter merged; what PEFT cannot express, and a hostile adapter folder, are one line
that writes nothing.

    python -m pytest -q tests/test_peft_adapter.py
"""
import dataclasses
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import export
from chat import ZEPHYR_TEMPLATE
from checkpoint import load_gpt, trainable_state
from conftest import run_python
from lora import attach_lora
from reward_model import RewardModel
from test_hf import CORPUS, FAMILIES, padded_batch, train_bpe_tokenizer_json, write_model
from train_utils import TrainConfig, lora_record, lora_targets

ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"  # one tensor of a qwen3 "all" adapter


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> a tiny random Hugging Face folder that transformers wrote, with a BPE tokenizer.json."""
    root = tmp_path_factory.mktemp("bases")
    (root / "corpus.txt").write_text("\n".join(CORPUS * 40) + "\n", encoding="utf-8")
    out = {}
    for name in ("qwen3", "phi3", "llama_gqa_untied", "gemma3", "gpt2"):
        out[name] = str(root / name)
        write_model(out[name], FAMILIES[name]())
        train_bpe_tokenizer_json(out[name], str(root / "corpus.txt"), bos_template=False)
    return out


def lora_checkpoint(base: str, path: str, targets: str, chat_template: str | None = None) -> None:
    """A LoRA checkpoint as the training scripts write it (adapters, lora_record, tokenizer), on
    `base`, its adapters random: a fresh B is zero, which would leave every comparison vacuous.
    Rank 4 and alpha 8, so a scaling of 2 that a lost alpha / r would change."""
    cfg = TrainConfig(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    model, tok = load_gpt(base)
    attach_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    if chat_template:
        tok = tok.with_chat_template(chat_template, True)
    torch.save({"model": trainable_state(model), "tokenizer": tok.state(), **lora_record(cfg, base)}, path)


def logits(model, hf: bool):
    """A model's logits of the real tokens of a padded batch: a transformers (or peft) model's, or ours."""
    ids, mask, positions = padded_batch("right")
    with torch.no_grad():
        out = (model.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits if hf
               else model.eval()(ids, mask))
    return out[mask.bool()]


def peft_model(base: str, adapter: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)


@pytest.mark.parametrize("family, targets, modules", [
    ("qwen3", "all", ALL),
    ("qwen3", "q_proj,v_proj", ["q_proj", "v_proj"]),
    # adapters over whole projections that Llama keeps apart: one A shared, B split by rows
    ("llama_gqa_untied", "qkv_proj,gate_up_proj", ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]),
    ("phi3", "all", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),  # fused in Hugging Face too
    ("gemma3", "all", ALL),
])
def test_peft_makes_an_exported_adapter_into_the_projects_merged_model(bases, tmp_path, family, targets, modules):
    base, ckpt, out = bases[family], str(tmp_path / "ckpt.pt"), str(tmp_path / "adapter")
    lora_checkpoint(base, ckpt, targets)
    assert export.main([f"--ckpt={ckpt}", "--adapter", f"--out_dir={out}"]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    config = json.load(open(f"{out}/adapter_config.json"))
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules",
                                   "base_model_name_or_path", "bias", "use_dora", "use_rslora")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8.0, target_modules=modules,
        base_model_name_or_path=os.path.abspath(base), bias="none", use_dora=False, use_rslora=False)
    theirs = logits(peft_model(base, out), hf=True)
    torch.testing.assert_close(theirs, logits(load_gpt(ckpt)[0], hf=False), atol=1e-5, rtol=0)
    alone = logits(transformers.AutoModelForCausalLM.from_pretrained(base), hf=True)
    assert (theirs - alone).abs().max() > 0.1  # the adapter is there to be compared


@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory):
    """(LoRA checkpoint, its adapter folder) on the qwen3 base, every projection adapted; the run's
    tokenizer has the Zephyr template, which the base's has not."""
    root = tmp_path_factory.mktemp("adapter")
    ckpt, out = str(root / "ckpt.pt"), str(root / "adapter")
    lora_checkpoint(bases["qwen3"], ckpt, "all", chat_template="zephyr")
    assert export.main([f"--ckpt={ckpt}", "--adapter", f"--out_dir={out}"]) == 0
    return ckpt, out


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_an_adapter_folder_reads_back_as_the_merged_model_with_the_runs_tokenizer(bases, adapter, tmp_path):
    ckpt, out = adapter
    merged, _ = load_gpt(ckpt)
    for lora_base in (bases["qwen3"], ""):  # given, or the base_model_name_or_path it names
        model, tok = load_gpt(out, lora_base=lora_base)
        assert_same_weights(model, merged)
        assert tok.chat_template == ZEPHYR_TEMPLATE
    assert load_gpt(bases["qwen3"])[1].chat_template is None
    moved = str(tmp_path / "moved")
    shutil.copytree(bases["qwen3"], moved)
    assert_same_weights(load_gpt(out, lora_base=moved)[0], merged)
    again = str(tmp_path / "again")  # a base that moved is the one the adapter names
    assert export.main([f"--ckpt={ckpt}", "--adapter", f"--lora_base={moved}", f"--out_dir={again}"]) == 0
    assert json.load(open(f"{again}/adapter_config.json"))["base_model_name_or_path"] == moved


@pytest.mark.parametrize("family, targets", [("qwen3", ["q_proj", "v_proj", "down_proj"]),
                                             ("phi3", ["qkv_proj", "gate_up_proj"])])
def test_an_adapter_peft_wrote_loads_with_peft_s_logits(bases, tmp_path, family, targets):
    """The reading side against an independent writer: peft's own save_pretrained, alpha / r = 4."""
    from peft import LoraConfig, get_peft_model
    base = bases[family]
    reference = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    reference.save_pretrained(str(tmp_path))
    model, tok = load_gpt(str(tmp_path))
    torch.testing.assert_close(logits(model, hf=False), logits(reference, hf=True), atol=1e-5, rtol=0)
    assert tok.vocab_size == load_gpt(base)[1].vocab_size  # no tokenizer files: the base's


@pytest.mark.slow
def test_a_lora_sft_run_exports_an_adapter_that_samples_and_trains_again(bases, tmp_path):
    """The real checkpoint of train_sft.py --lora_rank, exported; the adapter folder as
    train_sft.py's --init_from and sample.py's --ckpt, through the command line."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=f"Hello {i}", completion=" world, this is a test.")) + "\n"
                            for i in range(16)))
    args = [f"--train_file={data}", "--device=cpu", "--eval_interval=2", "--eval_samples=0", "--print_samples=0",
            "--max_length=32", "--max_new_tokens=4", "--batch_size=4", "--lr=1e-2", "--warmup_iters=0"]
    r = run_python("train_sft.py", f"--init_from={bases['qwen3']}", f"--out_dir={tmp_path}/lora", "--lora_rank=4",
                   "--max_iters=2", *args)
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "adapter")
    r = run_python("export.py", f"--ckpt={tmp_path}/lora", "--adapter", f"--out_dir={out}")
    assert r.returncode == 0 and "a PEFT LoRA adapter of rank 4" in r.stdout, r.stderr
    trained = load_gpt(f"{tmp_path}/lora")[0]
    assert_same_weights(load_gpt(out)[0], trained)
    assert (logits(trained, hf=False) - logits(load_gpt(bases["qwen3"])[0], hf=False)).abs().max() > 1e-3
    r = run_python("sample.py", f"--ckpt={out}", "--prompt=Hello", "--n=1", "--max_new_tokens=3", "--device=cpu")
    assert r.returncode == 0, r.stderr
    r = run_python("train_sft.py", f"--init_from={out}", f"--out_dir={tmp_path}/again", "--max_iters=1", *args)
    assert r.returncode == 0, r.stderr


def test_an_adapter_over_an_earlier_full_export_and_back_leaves_one_model(adapter, tmp_path, capsys):
    """transformers reads a folder with an adapter_config.json as that adapter on its base, and
    this loader a folder with a config.json as a full model: each export removes the other's files."""
    ckpt, _ = adapter
    out = str(tmp_path / "out")
    assert export.main([f"--ckpt={ckpt}", f"--out_dir={out}"]) == 0
    assert export.main([f"--ckpt={ckpt}", "--adapter", f"--out_dir={out}", "--overwrite"]) == 0
    assert ("removed the earlier model's model.safetensors, config.json, generation_config.json"
            in capsys.readouterr().out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert_same_weights(load_gpt(out)[0], load_gpt(ckpt)[0])
    assert export.main([f"--ckpt={ckpt}", f"--out_dir={out}", "--overwrite"]) == 0
    assert "adapter_config.json" not in os.listdir(out) and "adapter_model.safetensors" not in os.listdir(out)


# -----------------------------------------------------------------------------
# One line, exit status 2, nothing written


def full_checkpoint(bases, path):
    model, tok = load_gpt(bases["qwen3"])
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "tokenizer": tok.state()}, path)


def reward_checkpoint(bases, path):
    cfg = TrainConfig(lora_rank=4)
    model, tok = load_gpt(bases["qwen3"])
    rm = RewardModel.from_gpt(model)
    attach_lora(rm.backbone, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg))
    torch.save({"model": trainable_state(rm), "tokenizer": tok.state(), **lora_record(cfg, bases["qwen3"])}, path)


def lora_on_a_checkpoint(bases, path):
    full_checkpoint(bases, path + ".base.pt")
    lora_checkpoint(path + ".base.pt", path, "all")


EXPORT_REFUSED = {  # what --adapter is given -> what its one line says
    "full fine-tune": (full_checkpoint, "not the checkpoint of a LoRA run (--lora_rank), so it holds no adapters"),
    "reward model": (reward_checkpoint, "a reward model; --adapter writes a language model's LoRA adapters"),
    "part of phi3's qkv_proj": (lambda b, p: lora_checkpoint(b["phi3"], p, "q_proj,o_proj"),
                                "an adapter covers part of model.layers.0.self_attn.qkv_proj, and PEFT adapts"),
    "gpt2": (lambda b, p: lora_checkpoint(b["gpt2"], p, "all"), "and this model is gpt2; export the merged model"),
    "a base of this project": (lora_on_a_checkpoint, "this project's checkpoint, and a PEFT adapter goes on a Hugging"),
}


def refused(args, out, message, capsys):
    assert export.main([*args, f"--out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", EXPORT_REFUSED)
def test_what_peft_cannot_express_is_one_line_and_writes_nothing(bases, tmp_path, capsys, case):
    write, message = EXPORT_REFUSED[case]
    write(bases, str(tmp_path / "ckpt.pt"))
    capsys.readouterr()
    refused([f"--ckpt={tmp_path / 'ckpt.pt'}", "--adapter"], str(tmp_path / "out"), message, capsys)


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path))
    json.dump({**config, **changes}, open(path, "w"))


def edit_tensors(folder, edit):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def link_out(folder):
    outside = os.path.join(os.path.dirname(folder), "elsewhere.safetensors")
    shutil.move(os.path.join(folder, "adapter_model.safetensors"), outside)
    os.symlink(outside, os.path.join(folder, "adapter_model.safetensors"))


ADAPTER_REFUSED = {  # how the adapter folder is spoiled -> what the one line says
    "use_dora": (lambda d: edit_config(d, use_dora=True), "field 'use_dora': True is not supported"),
    "rank_pattern": (lambda d: edit_config(d, rank_pattern={"q_proj": 8}), "field 'rank_pattern'"),
    "layers_to_transform": (lambda d: edit_config(d, layers_to_transform=0), "field 'layers_to_transform': 0 is"),
    "an unknown field": (lambda d: edit_config(d, use_something_new=True), "field 'use_something_new': True is not"),
    "peft_type": (lambda d: edit_config(d, peft_type="IA3"), "field 'peft_type': 'IA3' is not LORA"),
    "bias": (lambda d: edit_config(d, bias="all"), "field 'bias': 'all' is not none"),
    "r zero": (lambda d: edit_config(d, r=0), "field 'r': 0 is not a positive integer"),
    "r past the hidden size": (lambda d: edit_config(d, r=10**9), "field 'r': 1000000000 is more than the base's"),
    "alpha": (lambda d: edit_config(d, lora_alpha=float("nan")), "field 'lora_alpha': nan is not a finite number"),
    "a regex": (lambda d: edit_config(d, target_modules=".*proj"), "is not a list of module names"),
    "a fused target on qwen3": (lambda d: edit_config(d, target_modules=["qkv_proj"]),
                                "['qkv_proj'] are not all projections of a qwen3 model"),
    "a missing base": (lambda d: edit_config(d, base_model_name_or_path="Qwen/Qwen3-0.6B"),
                       "'Qwen/Qwen3-0.6B', which is not a Hugging Face model folder here (nothing is downloaded): "
                       "give the base folder with --lora_base"),
    "a wrong shape": (lambda d: edit_tensors(d, lambda t: t.update({KEY.format("B"): torch.zeros(64, 5)})),
                      f"tensor {KEY.format('B')} has shape [64, 5] and dtype F32, the base and adapter_config.json "
                      "imply [64, 4]"),
    "an integer tensor": (lambda d: edit_tensors(d, lambda t: t.update({KEY.format("A"): torch.zeros(4, 32).int()})),
                          "has shape [4, 32] and dtype I32"),
    "a missing tensor": (lambda d: edit_tensors(d, lambda t: t.pop(KEY.format("A"))),
                         f"no tensor {KEY.format('A')} in adapter_model.safetensors"),
    "a tensor of no target": (lambda d: edit_tensors(d, lambda t: t.update({"lm_head.weight": torch.zeros(1)})),
                              "tensor lm_head.weight is not an adapter of target_modules on this base"),
    "a link out of the folder": (link_out, "outside the folder"),
}


@pytest.mark.parametrize("case", ADAPTER_REFUSED)
def test_a_hostile_adapter_folder_is_one_line_and_writes_nothing(adapter, tmp_path, capsys, case):
    spoil, message = ADAPTER_REFUSED[case]
    folder = str(tmp_path / "adapter")
    shutil.copytree(adapter[1], folder)
    spoil(folder)
    refused([f"--ckpt={folder}"], str(tmp_path / "out"), message, capsys)
