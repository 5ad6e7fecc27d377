"""A user's first real run, end to end: a random-weight Qwen2-style folder built by transformers,
with a byte-level BPE tokenizer and a ChatML template whose end-of-turn token (<|im_end|>) is not
its eos (<|endoftext|>), an untied head, and the user's own JSONL (conversations, UltraFeedback
pairs, conversational prompts), through SFT, DPO under 2 FSDP processes, the reward model under 2
DDP processes and PPO under 2 FSDP processes, with held-out sets that do not split evenly.

    python -m pytest -q tests/test_your_model.py
"""
import json
from pathlib import Path

import pytest
import torch
import transformers

import train_online_dpo
import train_sft
from checkpoint import load_gpt
from conftest import read_metrics, run_python
from evaluate import sample_completions

pytestmark = pytest.mark.slow
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# Qwen2.5's template, shortened: a default system turn, <|im_start|>role\n...<|im_end|>\n turns
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "grey"]
THINGS = ["sky", "grass", "coal", "snow", "sea", "rose", "mud", "ash"]


def question(i: int) -> str:
    return f"what colour is the {THINGS[i % 8]} number {i}?"


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    write_user_files(root)
    return root


def write_user_files(root):
    """The user's folder and files in root: model/, sft.jsonl (121 conversations: 6 held out),
    pairs.jsonl (64 UltraFeedback pairs) and val.jsonl (9: 5 + 4 over 2 ranks at batch 4, so one
    rank runs an empty padding batch under FSDP), prompts.jsonl (16 conversations)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{question(i)} the {THINGS[i % 8]} is {COLOURS[i % 8]}."
                                for i in range(200)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = root / "model"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        chat_template=CHATML)))
    eos = tok.token_to_id("<|endoftext|>")
    config = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    answer = lambda i, good=True: (f"the {THINGS[i % 8]} is "  # noqa: E731
                                   f"{COLOURS[i % 8] if good else COLOURS[(i + 3) % 8]}.")
    write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": question(i)},
                                                   {"role": "assistant", "content": answer(i)}]}
                                     for i in range(121)])
    pair = lambda i: {"prompt": question(i),  # noqa: E731
                      "chosen": [{"role": "user", "content": question(i)},
                                 {"role": "assistant", "content": answer(i)}],
                      "rejected": [{"role": "user", "content": question(i)},
                                   {"role": "assistant", "content": answer(i, good=False)}]}
    write_jsonl(root / "pairs.jsonl", [pair(i) for i in range(64)])
    write_jsonl(root / "val.jsonl", [pair(i) for i in range(100, 109)])
    write_jsonl(root / "prompts.jsonl", [{"prompt": [{"role": "user", "content": question(i)}]}
                                         for i in range(200, 216)])


def torchrun(script, *args):
    r = run_python(*TORCHRUN, script, *args, "--device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sft_dpo_rm_and_ppo_on_your_model_stop_at_its_end_of_turn_token(user, tmp_path):
    folder, out = user / "model", tmp_path
    # SFT, one process: the responses' labels end at <|im_end|>, so the model learns to stop there
    assert train_sft.main([f"--init_from={folder}", f"--train_file={user}/sft.jsonl", f"--out_dir={out}/sft",
                           "--device=cpu", "--batch_size=16", "--max_iters=60", "--lr=3e-3",
                           "--warmup_iters=5", "--eval_interval=60", "--eval_samples=8",
                           "--max_new_tokens=16", "--print_samples=0"]) == 0
    sft = f"{out}/sft/ckpt.pt"
    model, tok = load_gpt(sft)
    end_of_turn = tok.hf.token_to_id("<|im_end|>")
    assert tok.eos_id != end_of_turn and tok.stop_ids == sorted([tok.eos_id, end_of_turn])
    prompts = [[{"role": "user", "content": question(i)}] for i in range(300, 332)]
    ids, _, ended = sample_completions(model.eval(), tok, prompts, max_new_tokens=16, seed=0)
    assert sum(ended) >= 24  # most samples end (before the fix none did: the model never saw a stop token)
    # and every one that ends, at <|im_end|>
    assert all(row[-1] == end_of_turn for row, e in zip(ids, ended) if e)

    # DPO under 2 FSDP processes, the reference sharded too; 9 held-out pairs at batch 4 over 2 ranks
    pairs = [f"--sft_ckpt={sft}", f"--train_file={user}/pairs.jsonl", f"--val_file={user}/val.jsonl",
             "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--print_samples=0"]
    torchrun("train_dpo.py", *pairs, f"--out_dir={out}/dpo", "--parallel=fsdp")
    assert read_metrics(f"{out}/dpo")[-1]["eval/loss"] > 0
    # the reward model under 2 DDP processes: its untied lm_head is gone, so DDP's first step works
    torchrun("train_rm.py", *pairs, f"--out_dir={out}/rm")
    assert "eval/accuracy" in read_metrics(f"{out}/rm")[-1]
    # PPO with a critic under 2 FSDP processes, on conversational prompts, scored by that reward model
    r = torchrun("train_ppo.py", f"--sft_ckpt={sft}", f"--reward_ckpt={out}/rm/ckpt.pt",
                 f"--prompts={user}/prompts.jsonl", "--batch_size=8", "--gen_chunk=4", "--max_iters=2",
                 "--eval_interval=2", "--max_new_tokens=16", f"--out_dir={out}/ppo", "--parallel=fsdp")
    assert "gold evaluation is off" in r.stdout
    last = read_metrics(f"{out}/ppo")[-1]
    assert last["completions/ended_ratio"] >= 0.5 and last["completions/mean_length"] < 16
    policy, tok = load_gpt(f"{out}/ppo/ckpt.pt")
    ids, _, ended = sample_completions(policy.eval(), tok, prompts, max_new_tokens=16, seed=1)
    assert any(ended) and all(row[-1] == end_of_turn for row, e in zip(ids, ended) if e)
    # online DPO, one process, on the same conversational prompts and reward model
    assert train_online_dpo.main([f"--sft_ckpt={sft}", f"--reward_ckpt={out}/rm/ckpt.pt",
                                  f"--prompts={user}/prompts.jsonl", "--batch_size=4", "--gen_chunk=4",
                                  "--max_iters=2", "--eval_interval=2", "--max_new_tokens=16", "--device=cpu",
                                  f"--out_dir={out}/online_dpo", "--print_samples=0"]) == 0
    last = read_metrics(f"{out}/online_dpo")[-1]
    assert last["completions/ended_ratio"] >= 0.5 and last["step"] == 2 and "eval/gold_reward" not in last
