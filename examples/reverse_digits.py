"""
A verifiable task: reverse four digits ("reverse 4 0 6 6 =" -> "6 6 0 4"), every answer checked
exactly, and its reward function, exact_match, in TRL's signature: copy this file for a task of
your own. Writing the task:

    python examples/reverse_digits.py --out_dir data/reverse

gives sft.jsonl (2000 solved problems), prompts_train.jsonl (512 problems) and prompts_val.jsonl
(64 held out), no problem in two files; each prompt record carries its "answer", which the reward
function receives as a keyword list. Then SFT from scratch (a tokenizer is trained on the data),
and GRPO on the exact-match reward, its held-out exact match logged as eval/score:

    python train_sft.py --train_file data/reverse/sft.jsonl --out_dir out/reverse_sft --max_iters 100 \\
        --batch_size 32 --lr 1e-3 --vocab_size 300 --max_new_tokens 10
    python train_ppo.py --sft_ckpt out/reverse_sft --prompts data/reverse/prompts_train.jsonl \\
        --eval_prompts data/reverse/prompts_val.jsonl --reward functions \\
        --reward_fn examples/reverse_digits.py:exact_match --advantage grpo --samples_per_prompt 4 \\
        --batch_size 32 --gen_chunk 16 --max_iters 40 --max_new_tokens 10 --eval_interval 20 --lr 5e-4 \\
        --out_dir out/reverse_grpo
"""
import argparse
import json
import os
import random


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1 where the completion, stripped, is the record's answer, else 0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def write_task(out_dir: str, seed: int = 0, n_sft: int = 2000, n_train: int = 512, n_val: int = 64) -> None:
    rng, seen = random.Random(seed), set()

    def problem():  # a problem no file has yet
        while True:
            digits = [str(rng.randrange(10)) for _ in range(4)]
            prompt = "reverse " + " ".join(digits) + " ="
            if prompt not in seen:
                seen.add(prompt)
                return prompt, " ".join(reversed(digits))

    os.makedirs(out_dir, exist_ok=True)
    val, train = [problem() for _ in range(n_val)], [problem() for _ in range(n_train)]
    files = {"sft.jsonl": [{"prompt": p, "completion": " " + a} for p, a in (problem() for _ in range(n_sft))],
             "prompts_train.jsonl": [{"prompt": p, "answer": a} for p, a in train],
             "prompts_val.jsonl": [{"prompt": p, "answer": a} for p, a in val]}
    for name, records in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="data/reverse", help="where the three files go")
    parser.add_argument("--seed", type=int, default=0, help="draws the problems")
    write_task(parser.parse_args().out_dir, parser.parse_args().seed)
