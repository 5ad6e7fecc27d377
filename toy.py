"""
The built-in toy task: synthetic movie reviews, their gold sentiment reward (the yardstick every
stage is measured with), and the files it writes. It holds no reader of your own data (data.py).

    python toy.py                           # write the toy task to data/toy and train its tokenizer
    python toy.py --chat                    # the toy task as conversations, in data/toy_chat
"""
import argparse
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

import torch

from data import Example, load_sft
from files import write_atomic
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The toy task: synthetic movie reviews and a gold sentiment reward.
#
# A review is 2-4 sentences, each one of three templates (brackets are optional words):
#   T1  the NOUN was [not] [ADVERB] ADJECTIVE .
#   T2  i VERB the NOUN .
#   T3  i would [not] recommend it .
# Each review draws a latent positivity q ~ U(0, 1); every sentiment slot is positive with
# probability q, so a review leans one way but mixes, and a prefix of a few words says little
# about how the rest will go. That spread is what the preference stages learn from.

NOUNS = ["movie", "film", "plot", "acting", "story", "ending", "cast", "music", "script",
         "dialogue", "director", "pacing"]
POSITIVE = ["great", "wonderful", "brilliant", "superb", "moving", "delightful", "excellent",
            "charming", "beautiful", "fun"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "bad", "weak", "painful", "bland", "messy",
            "tedious"]
NEUTRAL = ["long", "short", "slow", "loud", "quiet", "simple"]
ADVERBS = ["very", "really", "quite", "so", "truly"]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "admired"]
NEGATIVE_VERBS = ["hated", "disliked", "loathed", "resented"]
NEUTRAL_VERBS = ["watched", "saw", "noticed"]
POLARITY = {**{w: 1 for w in POSITIVE + POSITIVE_VERBS + ["recommend"]},
            **{w: -1 for w in NEGATIVE + NEGATIVE_VERBS}}

_N, _ADJ, _ADV = "|".join(NOUNS), "|".join(POSITIVE + NEGATIVE + NEUTRAL), "|".join(ADVERBS)
_VERB = "|".join(POSITIVE_VERBS + NEGATIVE_VERBS + NEUTRAL_VERBS)
_SENTENCE = re.compile(
    rf"the ({_N}) was( not)?( ({_ADV}))? ({_ADJ})"
    rf"|i ({_VERB}) the ({_N})"
    rf"|i would( not)? recommend it"
)


def _toy_sentence(rng: random.Random, q: float) -> str:
    positive = rng.random() < q  # the sentiment this sentence expresses
    kind = rng.choices(["T1", "T2", "T3"], weights=[6, 3, 1])[0]
    if kind == "T1":
        if rng.random() < 0.25:
            adjective, negated = rng.choice(NEUTRAL), False
        else:
            negated = rng.random() < 0.2  # "not awful" is positive: negation flips polarity
            adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
        adverb = f" {rng.choice(ADVERBS)}" if rng.random() < 0.3 else ""
        return f"the {rng.choice(NOUNS)} was{' not' if negated else ''}{adverb} {adjective} ."
    if kind == "T2":
        verbs = rng.choice([POSITIVE_VERBS if positive else NEGATIVE_VERBS, NEUTRAL_VERBS]
                           if rng.random() < 0.25 else [POSITIVE_VERBS if positive else NEGATIVE_VERBS])
        return f"i {rng.choice(verbs)} the {rng.choice(NOUNS)} ."
    return f"i would{'' if positive else ' not'} recommend it ."


def toy_review(rng: random.Random) -> str:
    q = rng.random()
    return " ".join(_toy_sentence(rng, q) for _ in range(rng.randint(2, 4)))


def split_prompt(review: str, rng: random.Random) -> tuple[str, str]:
    """A prompt is the review's first 2-5 words; the completion is the rest."""
    words = review.split(" ")
    k = rng.randint(2, 5)
    return " ".join(words[:k]), " ".join(words[k:])


def gold_reward(completion: str, prompt: str = "") -> float:
    """Sentiment of a completion in (0, 1): sigmoid of the net count of its sentiment words, where
    a word after "not" in the same sentence counts with its sign flipped. The prompt only gives
    context (the prompt "the plot was not" makes the completion "dull ." positive); its own words
    do not count. Deterministic and monotone: one more positive word raises the reward, one more
    negative word lowers it, other words leave it unchanged, and a balanced completion scores 0.5."""
    negated = False
    for word in prompt.split():
        negated = (negated or word == "not") and word != "."
    net = 0
    for word in completion.split():
        if word == ".":
            negated = False
        elif word == "not":
            negated = True
        else:
            net += -POLARITY.get(word, 0) if negated else POLARITY.get(word, 0)
    return 1.0 / (1.0 + math.exp(-net))


def is_well_formed(review: str) -> bool:
    """True if `review` is 1 or more template sentences, each ending in " ." (the toy grammar)."""
    if not review.endswith(" ."):
        return False
    return all(_SENTENCE.fullmatch(s.strip()) for s in review[:-2].split(" ."))


@dataclass
class ToyConfig:
    seed: int = 0
    n_sft_train: int = 20000
    n_sft_val: int = 500
    n_prompts_train: int = 2000
    n_prompts_val: int = 256
    vocab_size: int = 512
    chat: bool = False  # the SFT files as conversations, and a tokenizer with the Zephyr markers


TOY_FILES = ["corpus.txt", "sft_train.jsonl", "sft_val.jsonl", "prompts_train.jsonl",
             "prompts_val.jsonl", "tokenizer.model", "meta.json"]


def prepare_toy_data(out_dir: str, cfg: ToyConfig = ToyConfig(), verbose: bool = True) -> None:
    """Write the toy task into `out_dir`: corpus.txt (SFT train reviews, for the tokenizer),
    sft_{train,val}.jsonl ({"prompt","completion"}; with cfg.chat {"messages"}: the user turn is the
    review's first words, the assistant's reply the rest), prompts_{train,val}.jsonl ({"prompt"}; train
    for preference sampling and PPO, val for held-out evaluation) and tokenizer.model. Every split
    comes from its own seeded stream, so the same seed gives the same files byte for byte. If the
    folder already holds the files for this config, they are reused."""
    meta = json.dumps(vars(cfg), sort_keys=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if all(os.path.exists(os.path.join(out_dir, f)) for f in TOY_FILES):
        with open(meta_path) as f:
            if f.read() == meta:
                if verbose:
                    print(f"toy data: reusing {out_dir}")
                return
    os.makedirs(out_dir, exist_ok=True)

    def reviews(split: int, n: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{cfg.seed}-{split}")
        return [split_prompt(toy_review(rng), rng) for _ in range(n)]

    def write_jsonl(name: str, records: list[dict]) -> None:
        write_atomic(os.path.join(out_dir, name), "".join(json.dumps(r) + "\n" for r in records))

    splits = [reviews(i, n) for i, n in enumerate(
        [cfg.n_sft_train, cfg.n_sft_val, cfg.n_prompts_train, cfg.n_prompts_val])]
    write_atomic(os.path.join(out_dir, "corpus.txt"), "".join(f"{p} {c}\n" for p, c in splits[0]))
    def sft_record(prompt: str, completion: str) -> dict:
        if cfg.chat:
            return {"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": completion}]}
        return {"prompt": prompt, "completion": completion}

    write_jsonl("sft_train.jsonl", [sft_record(p, c) for p, c in splits[0]])
    write_jsonl("sft_val.jsonl", [sft_record(p, c) for p, c in splits[1]])
    write_jsonl("prompts_train.jsonl", [{"prompt": p} for p, _ in splits[2]])
    write_jsonl("prompts_val.jsonl", [{"prompt": p} for p, _ in splits[3]])
    Tokenizer.train(os.path.join(out_dir, "corpus.txt"), cfg.vocab_size, cfg.chat).save(
        os.path.join(out_dir, "tokenizer.model"))
    write_atomic(meta_path, meta)  # last, so an interrupted write is redone next time
    if verbose:
        print(f"toy data: wrote {out_dir}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None,
                        help="folder for the toy task files (default data/toy, or data/toy_chat with --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="write the SFT data as conversations (user: the review's first words; "
                        "assistant: the rest) with a tokenizer that knows the Zephyr template's markers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the toy review generator")
    parser.add_argument("--vocab_size", type=int, default=512, help="tokenizer vocabulary cap")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or ("data/toy_chat" if args.chat else "data/toy")
    cfg = ToyConfig(seed=args.seed, vocab_size=args.vocab_size, chat=args.chat)
    prepare_toy_data(out_dir, cfg)
    tok = Tokenizer.load(os.path.join(out_dir, "tokenizer.model"))
    examples = load_sft(os.path.join(out_dir, "sft_train.jsonl"))
    if args.chat:
        tok = tok.with_chat_template("zephyr", chat_data=True)
        print(f"the first conversation as the model reads it: {tok.render(examples[0].messages)!r}")
        examples = [Example(e.messages[0]["content"], e.messages[1]["content"], e.where) for e in examples]
    rewards = torch.tensor([gold_reward(e.completion, e.prompt) for e in examples])
    print(f"tokenizer: {tok.vocab_size} pieces; gold reward of the {len(examples)} training completions: "
          f"mean {rewards.mean():.3f}, std {rewards.std():.3f}")
    for e in examples[:3]:
        print(f"prompt: {e.prompt!r}  completion: {e.completion!r}  "
              f"gold_reward: {gold_reward(e.completion, e.prompt):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
