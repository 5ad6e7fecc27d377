"""
Data: the tokenizer, the built-in toy task with its gold reward, JSONL readers that
validate every record, and collation into padded tensors.

    python data.py                          # write the toy task to data/toy and train its tokenizer
    python data.py --chat                   # the toy task as conversations, in data/toy_chat
    python data.py --check FILE --kind preference   # validate a JSONL file, report the first bad record
"""
import argparse
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import sentencepiece as spm
import torch

from chat import ROLES, ZEPHYR_TEMPLATE, ChatError, encode_conversation, encode_prompt_response, render

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in torch's cross_entropy


class DataError(ValueError):
    """A bad input record; the message names the file, line and field."""


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Text to token ids and back, with the special ids a model was trained with. Two backends:
    a sentencepiece model (the toy task's, and Llama-2, TinyLlama, Mistral's `tokenizer.model`)
    or a Hugging Face `tokenizer.json` (GPT-2, SmolLM2, Qwen2) read by the `tokenizers` library.
    The toy tokenizer has byte fallback, so any text encodes and `decode(encode(text)) == text`
    exactly (no normalisation, whitespace kept)."""

    TOY_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)  # the toy tokenizer's special pieces
    CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "\n"]  # one piece each in the chat toy's tokenizer

    def __init__(self, kind: str, data: bytes | str, bos_id: int | None, eos_id: int, pad_id: int,
                 add_bos: bool = True, chat_template: str | None = None, eos_ids: list[int] | None = None,
                 template_source: str | None = None):
        self.kind, self.data = kind, data  # data travels inside checkpoints, so a checkpoint samples alone
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.eos_ids = sorted({eos_id, *(eos_ids or ())})  # every id the model may end with (generation_config's list)
        self.add_bos = add_bos and bos_id is not None  # whether a prompt starts with bos
        self.chat_template = chat_template  # Jinja source; when set, every prompt is a user turn of a conversation
        self.template_source = template_source  # where the template came from (a file, a flag), named in its errors
        if kind == "sentencepiece":
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            self.vocab_size = self.sp.get_piece_size()
            self.unk_id = self.sp.unk_id()
            # control pieces (<s>, </s>, ...) written in a template's text are those tokens, as in transformers
            controls = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
            self._controls = controls
            self._control_re = re.compile("|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True)) or "(?!)")
        else:
            from tokenizers import Tokenizer as HFTokenizer  # only for Hugging Face folders
            self.hf = HFTokenizer.from_str(data)
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.unk_id = None
        self.end_of_turn_id = self._end_of_turn() if chat_template else None
        self.stop_ids = sorted({*self.eos_ids, *([self.end_of_turn_id] if self.end_of_turn_id is not None else [])})
        self.special_ids = {i for i in (bos_id, pad_id, *self.stop_ids) if i is not None}  # never decoded to text

    @classmethod
    def toy(cls, model_proto: bytes) -> "Tokenizer":
        ids = cls.TOY_IDS
        return cls("sentencepiece", model_proto, ids["bos_id"], ids["eos_id"], ids["pad_id"])

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """The toy task's tokenizer.model."""
        with open(path, "rb") as f:
            return cls.toy(f.read())

    @classmethod
    def train(cls, text_file: str, vocab_size: int = 512, chat: bool = False) -> "Tokenizer":
        """BPE over `text_file` (one document a line). The vocabulary is capped at `vocab_size` but
        may come out smaller on a small corpus such as the toy task. With chat=True the Zephyr
        template's markers and the newline are pieces of their own, and a text gets no leading
        word-boundary piece (a template's text is cut at its special tokens)."""
        proto = io.BytesIO()
        extra = dict(user_defined_symbols=cls.CHAT_MARKERS, add_dummy_prefix=False) if chat else {}
        spm.SentencePieceTrainer.train(
            input=text_file, model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, normalization_rule_name="identity",
            remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **cls.TOY_IDS, **extra,
        )
        return cls.toy(proto.getvalue())

    def state(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain values for a checkpoint."""
        return dict(kind=self.kind, data=self.data, bos_id=self.bos_id, eos_id=self.eos_id,
                    pad_id=self.pad_id, add_bos=self.add_bos, chat_template=self.chat_template, eos_ids=self.eos_ids)

    def _end_of_turn(self) -> int | None:
        """The special token the chat template ends an assistant turn with (Zephyr: eos;
        ChatML: <|im_end|>; Llama-3: <|eot_id|>): the first token after a rendered reply, if that
        is a special token. A model stops generating there, so it is a stop id; what the template
        writes after it (a newline) is never generated and carries no loss. Rendering this probe
        when the tokenizer is made also refuses a template that cannot work before anything runs."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine"}]
        try:
            text = self.render(messages)
            before = self.render(messages[:1], add_generation_prompt=True)
        except ChatError as e:
            raise DataError(f"{e} (on a test conversation: a user turn and a reply)") from None
        reply = text.find("Fine", len(before))
        if reply < 0:
            return None
        end = reply + len("Fine")
        ids, starts = self.encode_with_offsets(text)
        after = [i for i, s in zip(ids, starts) if s >= end]
        return after[0] if after and after[0] in self.special_token_ids() else None

    def special_token_ids(self) -> set[int]:
        """Ids of the tokenizer's special tokens (control pieces; tokenizer.json's special added tokens)."""
        if self.kind == "sentencepiece":
            return set(self._controls.values())
        return {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def with_chat_template(self, choice: str, chat_data: bool) -> "Tokenizer":
        """This tokenizer with the chat template a run asked for (--chat_template): auto keeps the
        model's own, or takes Zephyr's for conversation records when the model has none; zephyr is
        the built-in one; none renders no conversation; anything else is a Jinja file to read."""
        builtin = (ZEPHYR_TEMPLATE, "built-in Zephyr")
        if choice == "auto":
            template, source = ((self.chat_template, self.template_source) if self.chat_template
                                else builtin if chat_data else (None, None))
        elif choice in ("zephyr", "none"):
            template, source = builtin if choice == "zephyr" else (None, None)
        else:
            if not os.path.isfile(choice):
                raise DataError(f"--chat_template {choice}: not auto, zephyr, none or a Jinja file")
            try:
                with open(choice, encoding="utf-8") as f:
                    template, source = f.read(), f"--chat_template {choice}"
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"--chat_template {choice}: cannot be read as UTF-8 text ({e})") from None
        if chat_data and template is None:
            raise DataError("the data holds conversations but --chat_template none renders none")
        return Tokenizer(**{**self.state(), "chat_template": template}, template_source=source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages`, with this tokenizer's special tokens."""
        return render(self.chat_template, messages, self.special_tokens(), add_generation_prompt, self.template_source)

    @classmethod
    def from_state(cls, state: dict | bytes, where: str) -> "Tokenizer":
        """The tokenizer of the checkpoint `where`; bytes are the toy tokenizer of checkpoints
        written before Hugging Face folders were supported. A state this project did not write,
        or special ids outside the vocabulary, is one DataError line."""
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)
        if isinstance(state, dict):
            known = set(inspect.signature(cls).parameters)
            if not (set(state) <= known and state.get("kind") in ("sentencepiece", "tokenizers")
                    and isinstance(state.get("data"), (bytes, str)) and whole(state.get("eos_id"))
                    and whole(state.get("pad_id")) and (state.get("bos_id") is None or whole(state["bos_id"]))
                    and all(whole(i) for i in state.get("eos_ids") or [])):
                raise DataError(f"{where}: its tokenizer is not one this project wrote")
        try:  # a chat template's errors name the checkpoint it came in
            tok = cls.toy(state) if isinstance(state, bytes) else cls(**{**state, "template_source": where})
        except DataError:
            raise
        except Exception as e:  # sentencepiece or tokenizers refusing the data
            raise DataError(f"{where}: its tokenizer cannot be read ({type(e).__name__})") from None
        outside = [i for i in (tok.bos_id, tok.pad_id, *tok.eos_ids) if i is not None and not 0 <= i < tok.vocab_size]
        if outside:
            raise DataError(f"{where}: special token ids {outside} lie outside the tokenizer's {tok.vocab_size} tokens")
        return tok

    def save(self, path: str) -> None:
        write_atomic(path, self.data)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        if self.kind == "sentencepiece":
            return self.sp.encode(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """A prompt as the model sees it: bos (where the model uses one), then the prompt's tokens;
        with a chat template, the prompt as a user turn followed by the generation prompt. A prompt
        that is a conversation (a list of messages) is rendered the same way and needs a template."""
        if isinstance(prompt, list) and not self.chat_template:
            raise DataError("a prompt that is a list of messages needs a chat template (--chat_template)")
        if self.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            try:
                return self.encode_with_offsets(self.render(messages, add_generation_prompt=True))[0]
            except ChatError as e:  # scripts stop on a DataError with one line
                raise DataError(str(e)) from None
        return [self.bos_id] * self.add_bos + self.encode(prompt)

    def token_text(self, i: int | None) -> str:
        if i is None:
            return ""
        return self.sp.id_to_piece(i) if self.kind == "sentencepiece" else self.hf.id_to_token(i)

    def special_tokens(self) -> dict[str, str]:
        """The special tokens' text, as a chat template reads them."""
        return {"bos_token": self.token_text(self.bos_id), "eos_token": self.token_text(self.eos_id),
                "pad_token": self.token_text(self.pad_id), "unk_token": self.token_text(self.unk_id)}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation, special tokens written in it included, and the
        character where each token starts (tokens are labelled by where they start)."""
        if self.kind != "sentencepiece":
            encoding = self.hf.encode(text, add_special_tokens=False)
            return encoding.ids, [start for start, _ in encoding.offsets]
        ids, starts, done = [], [], 0
        for match in [*self._control_re.finditer(text), None]:
            end = match.start() if match else len(text)
            if end > done:
                piece_ids, piece_starts = self._sp_offsets(text[done:end])
                ids += piece_ids
                starts += [done + s for s in piece_starts]
            if match:
                ids.append(self._controls[match.group()])
                starts.append(match.start())
                done = match.end()
        return ids, starts

    def _sp_offsets(self, text: str) -> tuple[list[int], list[int]]:
        try:
            proto = self.sp.encode(text, return_type="proto")
        except TypeError:  # sentencepiece before 0.2.3
            proto = self.sp.encode(text, out_type="immutable_proto")
        char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
        return [p.id for p in proto.pieces], [char_of_byte[p.begin] for p in proto.pieces]

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.special_ids]
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)


def load_checkpoint(path: str) -> dict:
    """A ckpt.pt as a dict of tensors and plain values. A checkpoint is data, never code:
    weights_only=True refuses anything else (unpickling another object could run code). A file
    that is not a checkpoint this project wrote is one DataError line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch fails on an empty, cut or foreign file in many ways (EOFError, RuntimeError, ...)
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:  # weights_only names the class it refused
            raise DataError(f"{path}: not a checkpoint this project wrote: it holds Python objects other than tensors "
                            f"({refused[1]}), which are never loaded, as loading them could run code") from None
        raise DataError(f"{path}: not a readable checkpoint (empty, truncated or not written by torch.save)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)  # what the loaders read
            and isinstance(ckpt.get("tokenizer"), (dict, bytes))
            and isinstance(ckpt.get("model_config") or ckpt.get("lora"), dict)):
        raise DataError(f"{path}: not a checkpoint this project wrote (no 'model', 'tokenizer' and 'model_config' "
                        "or 'lora' in it)")
    return ckpt


def make_out_dir(path: str) -> None:
    """Create --out_dir (and its parents): one line when it cannot be written, before a script
    loads anything, rather than an OSError once the work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:  # a read-only or full disk, a file in the way
        raise DataError(f"--out_dir {path}: cannot write there ({e.strerror})") from None


def write_atomic(path: str, data: bytes | str) -> None:
    """Write to a temporary file then rename, so a crash never leaves a half-written file."""
    def write(tmp):
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    replace_atomically(path, write)


def replace_atomically(path: str, write) -> None:
    """write(tmp) to a temporary file beside `path` (named by process, so two writers never share
    one), flushed to disk, then renamed over `path`: a kill leaves the old file or the new one,
    never half of one; a failed write (a full disk) removes its temporary file and raises."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
            return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
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


# -----------------------------------------------------------------------------
# JSONL readers. Every record is checked; a bad one raises DataError naming file, line and field,
# or, with skip_bad=True, is dropped and counted.


@dataclass
class Example:
    """A prompt and its completion (a plain-text record has prompt ""), or a conversation."""
    prompt: str
    completion: str
    where: str  # "file:line", for error messages
    messages: Optional[list[dict]] = None  # a conversation: loss on every assistant turn
    prompt_turns: int = 0  # a conversation's leading messages that carry no loss (a prompt-completion record's prompt)


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str
    prompt_messages: Optional[list[dict]] = None  # the conversation before the responses, if the record has one


def read_jsonl(path: str):
    """Yield (where, record) for each non-blank line of a JSONL file. A line that is not UTF-8
    or not a JSON object yields a DataError in place of the record, so a caller may skip it and
    go on. A UTF-8 byte-order mark (as some Windows tools write) is accepted."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                record = DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text_field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: field '{field}': missing")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}': empty")
    return value


def _messages(record: dict, field: str, where: str) -> list[dict]:
    """A conversation: a non-empty list of {"role", "content"} with a known role each."""
    messages = record.get(field)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}': expected a non-empty list of messages")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            missing = [k for k in ("role", "content") if not isinstance(m, dict) or k not in m]
            raise DataError(f"{where}: field '{field}[{j}]': expected {{\"role\", \"content\"}} strings"
                            + (f" ('{missing[0]}' missing)" if missing else ""))
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{j}].role': unknown role {m['role']!r} (expected {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt(record: dict, where: str) -> list[dict]:
    """ShareGPT: "conversations", a list of {"from": "human" | "gpt" | "system", "value"} turns, as
    {"role", "content"} messages; a top-level "system" string (LLaMA-Factory's) comes first."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations': expected a non-empty list of ShareGPT turns")
    messages = [{"role": "system", "content": _text_field(record, "system", where)}] if record.get("system") else []
    for j, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise DataError(f"{where}: field 'conversations[{j}]': expected ShareGPT {{\"from\", \"value\"}} strings")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: field 'conversations[{j}].from': unknown speaker {turn['from']!r} "
                            f"(ShareGPT's are {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _ends_with_assistant(messages: list[dict], field: str, where: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}': last message is not from the assistant")
    return _text_field(messages[-1], "content", f"{where}: field '{field}[-1]'")


def _ultrafeedback(record: dict, where: str) -> tuple[list[dict], str, str]:
    """UltraFeedback-binarized: chosen and rejected are whole conversations ending in the two
    responses (or the responses alone, after a "prompt" string or conversation)."""
    chosen, rejected = (_messages(record, f, where) for f in ("chosen", "rejected"))
    responses = [_ends_with_assistant(m, f, where) for m, f in ((chosen, "chosen"), (rejected, "rejected"))]
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: field 'rejected': its conversation differs from 'chosen' before the last assistant turn")
    if len(chosen) > 1:
        prompt_messages = chosen[:-1]
    elif isinstance(record.get("prompt"), list):
        prompt_messages = _messages(record, "prompt", where)
    else:
        prompt_messages = [{"role": "user", "content": _text_field(record, "prompt", where)}]
    if prompt_messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the conversation before the responses does not end with a user turn")
    return prompt_messages, *responses


HH_SEPARATOR = "\n\nAssistant:"


def _split_hh(record: dict, field: str, where: str) -> tuple[str, str]:
    """Anthropic HH-RLHF: a whole transcript; the prompt ends at the last "\\n\\nAssistant:"."""
    text = _text_field(record, field, where)
    cut = text.rfind(HH_SEPARATOR)
    if cut < 0:
        raise DataError(f"{where}: field '{field}': no '\\n\\nAssistant:' turn")
    cut += len(HH_SEPARATOR)
    return text[:cut], text[cut:].strip()


def _split_implicit(record: dict, where: str) -> tuple[str, str, str]:
    """TRL's implicit prompt: chosen and rejected are whole texts and the prompt is their longest
    common prefix, less a space it ends with (that space starts both responses), as TRL's
    extract_prompt cuts them. The cut falls where the texts first differ, even inside a word."""
    chosen, rejected = (_text_field(record, f, where) for f in ("chosen", "rejected"))
    n = len(os.path.commonprefix([chosen, rejected]))
    if n and chosen[n - 1] == " ":
        n -= 1
    if not chosen[:n].strip():
        raise DataError(f"{where}: field 'rejected': shares no prompt with 'chosen' (no 'prompt' field, "
                        "so the prompt is the text both start with)")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[n:].strip():
            raise DataError(f"{where}: field '{field}': empty response after the prompt both start with ({chosen[:n]!r})")
    return chosen[:n], chosen[n:], rejected[n:]


def _sharegpt_pair(record: dict, where: str) -> tuple[list[dict], str, str]:
    """LLaMA-Factory's ShareGPT pairs: "conversations" ending in a human turn, and "chosen" and
    "rejected" each one {"from": "gpt", "value"} reply."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: field 'conversations': a ShareGPT conversation without 'chosen' and 'rejected' "
                        "replies is SFT data, not a preference pair")
    prompt_messages = _sharegpt(record, where)
    if prompt_messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'conversations': last turn is not from the human")
    replies = []
    for field in ("chosen", "rejected"):
        reply = record[field]
        if not (isinstance(reply, dict) and reply.get("from") == "gpt"):
            raise DataError(f"{where}: field '{field}': expected a ShareGPT reply {{\"from\": \"gpt\", \"value\"}}")
        replies.append(_text_field(reply, "value", f"{where}: field '{field}'"))
    return prompt_messages, *replies


def _parse_pair(record: dict, fmt: str, where: str) -> Pair:
    if "conversations" in record and fmt != "sharegpt":
        raise DataError(f"{where}: field 'conversations': a ShareGPT record in a file read as {fmt} "
                        "(--format, or the file's first record)")
    if fmt == "plain":
        prompt = _text_field(record, "prompt", where)
        chosen, rejected = (_text_field(record, f, where) for f in ("chosen", "rejected"))
    elif fmt == "hh":
        prompt, chosen = _split_hh(record, "chosen", where)
        prompt_r, rejected = _split_hh(record, "rejected", where)
        if prompt != prompt_r:
            raise DataError(f"{where}: field 'rejected': its conversation differs from 'chosen' "
                            "before the last assistant turn")
        if not chosen or not rejected:
            raise DataError(f"{where}: field '{'chosen' if not chosen else 'rejected'}': empty response")
    elif fmt == "implicit":
        prompt, chosen, rejected = _split_implicit(record, where)
    elif fmt in ("ultrafeedback", "sharegpt"):
        prompt_messages, chosen, rejected = (_ultrafeedback if fmt == "ultrafeedback" else _sharegpt_pair)(record, where)
        if chosen == rejected:
            raise DataError(f"{where}: field 'rejected': identical to 'chosen'")
        return Pair(prompt_messages[-1]["content"], chosen, rejected, where, prompt_messages)
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    if chosen == rejected:
        raise DataError(f"{where}: field 'rejected': identical to 'chosen'")
    return Pair(prompt, chosen, rejected, where)


def _parse_example(record: dict, fmt: str, where: str) -> Example:
    if fmt == "text":
        return Example("", _text_field(record, "text", where), where)
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        messages = _messages(record, field, where) if fmt == "messages" else _sharegpt(record, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field '{field}': no assistant turn (nothing to learn from)")
        return Example("", "", where, messages)
    if fmt == "conversational_prompt_completion":
        prompt, completion = (_messages(record, f, where) for f in ("prompt", "completion"))
        if completion[0]["role"] != "assistant":
            raise DataError(f"{where}: field 'completion[0].role': expected 'assistant', got {completion[0]['role']!r}")
        return Example("", "", where, prompt + completion, prompt_turns=len(prompt))  # loss on the completion, as TRL
    return Example(_text_field(record, "prompt", where), _text_field(record, "completion", where), where)


def _detect(kind: str, record: dict) -> str:
    if "conversations" in record:
        return "sharegpt"
    if kind == "sft":
        if "messages" in record:
            return "messages"
        if isinstance(record.get("prompt"), list):
            return "conversational_prompt_completion"
        return "text" if "text" in record and "completion" not in record else "prompt_completion"
    if isinstance(record.get("chosen"), list):
        return "ultrafeedback"
    if "prompt" in record:
        return "plain"
    return "hh" if HH_SEPARATOR in str(record.get("chosen")) else "implicit"


SFT_FORMATS = ["auto", "prompt_completion", "text", "messages", "conversational_prompt_completion", "sharegpt"]
PREFERENCE_FORMATS = ["auto", "plain", "hh", "implicit", "ultrafeedback", "sharegpt"]


def _load(path: str, kind: str, fmt: str, skip_bad: bool, parse) -> list:
    records, skipped, first_error = [], 0, None
    for where, record in read_jsonl(path):
        try:
            if isinstance(record, DataError):
                raise record
            if fmt == "auto":
                fmt = _detect(kind, record)  # the first record decides for the whole file
            records.append(parse(record, fmt, where))
        except DataError as e:
            if not skip_bad:
                raise
            skipped, first_error = skipped + 1, first_error or str(e)
    if skipped:
        print(f"warning: skipped {skipped} bad records in {path} (first: {first_error})", file=sys.stderr)
    if not records:
        raise DataError(f"{path}: no valid records")
    return records


def load_sft(path: str, fmt: str = "auto", skip_bad: bool = False) -> list[Example]:
    """SFT data: {"prompt", "completion"} (loss on the completion), {"text"} (loss on all of it),
    {"messages": [{"role", "content"}, ...]} (UltraChat's layout; loss on every assistant turn),
    TRL's conversational {"prompt": [messages], "completion": [assistant messages]} or ShareGPT's
    {"conversations": [{"from", "value"}, ...]} (both read as one conversation, as "messages")."""
    return _load(path, "sft", fmt, skip_bad, _parse_example)


def load_preferences(path: str, fmt: str = "auto", skip_bad: bool = False) -> list[Pair]:
    """Preference pairs: plain {"prompt","chosen","rejected"}, Anthropic HH-RLHF transcripts, TRL's
    implicit prompt ({"chosen","rejected"} whole texts that share the prompt), UltraFeedback-binarized
    message lists, or LLaMA-Factory's ShareGPT pairs; "auto" recognises the format from the first record."""
    return _load(path, "preference", fmt, skip_bad, _parse_pair)


def _parse_prompt(record: dict, _, where: str) -> str | list[dict]:
    if not isinstance(record.get("prompt"), list):
        return _text_field(record, "prompt", where)
    messages = _messages(record, "prompt", where)
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': last message is not from the user")
    return messages


def load_prompts(path: str, skip_bad: bool = False) -> list[str | list[dict]]:
    """Prompts, one {"prompt"} record a line (other fields are ignored): a string, or TRL's
    conversational prompt, a list of {"role", "content"} messages ending in a user turn."""
    return _load(path, "prompts", "prompt", skip_bad, _parse_prompt)


# -----------------------------------------------------------------------------
# Tokenisation, truncation and collation.
#
# Truncation policy, TRL's: a sequence is [bos] + prompt + response + [eos] (bos where the tokenizer
# uses one). A prompt longer than max_prompt_length (unset: max_length less one, so a response keeps
# at least one token) keeps its last tokens, the ones nearest the response, bos kept. The response
# is then cut on the right to fit max_length (losing its eos). With a chat template the sequence is
# the rendered conversation: a long prompt loses whole turns, then its user turn's text is cut on the
# left (chat.encode_conversation, encode_prompt_response). How many records were cut is printed once
# per dataset; a record that cannot fit at all is a DataError naming its file and line.


def encode_example(tok: Tokenizer, prompt: str, response: str, max_length: int,
                   max_prompt_length: int | None, where: str,
                   prompt_messages: list[dict] | None = None) -> tuple[list[int], int, bool]:
    """Token ids of one sequence, the number of leading tokens that carry no loss, and whether
    truncation cut it."""
    if tok.chat_template:
        try:
            return encode_prompt_response(tok, prompt_messages or [{"role": "user", "content": prompt}], response,
                                          max_length, max_prompt_length)
        except ChatError as e:
            raise DataError(f"{where}: field 'prompt': {e}") from None
    prompt_ids = tok.encode_prompt(prompt)
    limit = min(max_prompt_length or max_length - 1, max_length - 1)
    prompt_cut = len(prompt_ids) > limit
    if prompt_cut:
        head = [tok.bos_id] * tok.add_bos
        prompt_ids = head + prompt_ids[len(prompt_ids) - limit + len(head):]
    room = max_length - len(prompt_ids)
    if room < 1:  # only bos is left, and max_length has no room after it
        raise DataError(f"{where}: field 'prompt': {len(prompt_ids)} tokens leave no room for a "
                        f"response within max_length={max_length}")
    response_ids = tok.encode(response) + [tok.eos_id]
    return prompt_ids + response_ids[:room], len(prompt_ids), prompt_cut or len(response_ids) > room


def collate(sequences: list[tuple[list[int], int | list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to one length. Each sequence comes with the number of leading tokens that carry
    no loss, or a per-token list of which tokens carry loss (a conversation's assistant turns).
    Returns input_ids, attention_mask (1 = real token) and labels, a copy of input_ids with
    IGNORE_INDEX where no loss is taken (prompt, other turns, padding); all (B, T)."""
    T = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, loss_on) in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        if isinstance(loss_on, int):
            labels[i, loss_on:len(ids)] = input_ids[i, loss_on:len(ids)]
        else:
            labels[i, :len(ids)] = torch.where(torch.tensor(loss_on, dtype=torch.bool), input_ids[i, :len(ids)], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_sft(tok: Tokenizer, e: Example, max_length: int, max_prompt_length: int | None):
    """Token ids of one SFT example, which tokens carry no loss (a count, or per token for a
    conversation), and whether truncation cut it."""
    if e.messages is None:
        return encode_example(tok, e.prompt, e.completion, max_length, max_prompt_length, e.where)
    if not tok.chat_template:
        raise DataError(f"{e.where}: field 'messages': a conversation needs a chat template (--chat_template)")
    try:
        return encode_conversation(tok, e.messages, max_length, e.prompt_turns)
    except ChatError as err:
        raise DataError(f"{e.where}: field 'messages': {err}") from None


def report_cuts(records: list, cut: list[bool], max_length: int, max_prompt_length: int | None) -> None:
    """One line on stderr saying how many records truncation cut, so that limits too tight for the
    data show before training rather than as a worse model after it."""
    if any(cut):
        files = ", ".join(sorted({r.where.rsplit(":", 1)[0] for r in records}))
        limits = f"--max_length {max_length}" + (f" / --max_prompt_length {max_prompt_length}" if max_prompt_length else "")
        print(f"note: {sum(cut)} of {len(records)} records in {files} were cut to fit {limits}", file=sys.stderr)


def tokenize_sft(examples: list[Example], tok: Tokenizer, max_length: int, max_prompt_length: int | None,
                 verbose: bool = True) -> dict[str, torch.Tensor]:
    """Every example tokenised once, padded into one set of (N, T) tensors; batches are slices.
    verbose: print how many were cut (under torchrun, on one process)."""
    encoded = [encode_sft(tok, e, max_length, max_prompt_length) for e in examples]
    if verbose:
        report_cuts(examples, [cut for *_, cut in encoded], max_length, max_prompt_length)
    return collate([(ids, loss_on) for ids, loss_on, _ in encoded], tok.pad_id)


def tokenize_pairs(pairs: list[Pair], tok: Tokenizer, max_length: int, max_prompt_length: int | None,
                   verbose: bool = True) -> dict[str, torch.Tensor]:
    """Every pair tokenised once: chosen_ and rejected_ input_ids, attention_mask and labels,
    all (N, T) with one T, so a batch's chosen and rejected rows stack into one forward pass.
    verbose: print how many pairs were cut (under torchrun, on one process)."""
    encoded = [encode_example(tok, p.prompt, response, max_length, max_prompt_length, p.where, p.prompt_messages)
               for p in pairs for response in (p.chosen, p.rejected)]  # rows alternate chosen, rejected
    if verbose:
        report_cuts(pairs, [encoded[i][2] or encoded[i + 1][2] for i in range(0, len(encoded), 2)],
                    max_length, max_prompt_length)
    both = collate([(ids, n_prompt) for ids, n_prompt, _ in encoded], tok.pad_id)
    return {f"{side}_{k}": v[i::2] for i, side in enumerate(("chosen", "rejected")) for k, v in both.items()}


def take(tensors: dict[str, torch.Tensor], index: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
    """Rows `index` of padded (N, T) tensors, trimmed to the longest real sequence among them
    (every key ending in attention_mask counts, so chosen and rejected stay one length), and
    the same rows of per-example (N,) tensors; moved to `device` if one is given. An empty index
    gives empty (0, 1) rows: the batch a rank with fewer held-out rows runs under FSDP, where every
    forward is collective."""
    T = max(int(v[index].sum(1).max()) if len(index) else 1 for k, v in tensors.items() if k.endswith("attention_mask"))
    return {k: (v[index, :T] if v.dim() == 2 else v[index]).to(device) for k, v in tensors.items()}


def real_tokens(tensors: dict[str, torch.Tensor], index: torch.Tensor) -> int:
    """Real (unpadded) tokens in rows `index`, over every attention mask (chosen and rejected)."""
    return int(sum(v[index].sum() for k, v in tensors.items() if k.endswith("attention_mask")))


def concatenate_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of B pairs as 2B rows, chosen first: input_ids, attention_mask and labels, each
    (2B, T). DPO and the reward model run chosen and rejected through one forward pass."""
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                 for k in ("input_ids", "attention_mask", "labels"))


def hold_out(records: list, path: str, verbose: bool) -> tuple[list, list]:
    """A file's records split into training and held-out ones (the last 5%, at least one), for a
    run given no --val_file: a user's data is never evaluated on the toy task's files."""
    n_val = max(1, len(records) // 20)
    if len(records) < 2:
        raise DataError(f"{path}: {len(records)} record(s): too few to hold some out (give --val_file)")
    if verbose:
        print(f"note: no --val_file: the last {n_val} of the {len(records)} records of {path} are held out")
    return records[:-n_val], records[-n_val:]


# -----------------------------------------------------------------------------
# Preference pairs as DPO and the reward model read them: their settings (a dataclass the two
# scripts' configs inherit) and the loader.


@dataclass
class PairsConfig:
    """The preference-data settings of train_dpo.py and train_rm.py."""
    train_file: str = ""
    """preference pairs (plain, HH-RLHF, TRL implicit-prompt, UltraFeedback-binarized or ShareGPT JSONL); empty: the toy task's out/pairs/pairs_train.jsonl (not with a Hugging Face model)"""
    val_file: str = ""
    """held-out preference pairs; empty: out/pairs/pairs_val.jsonl on the toy task, else the last 5% of --train_file"""
    format: Literal["auto", "plain", "hh", "implicit", "ultrafeedback", "sharegpt"] = "auto"
    """record format; auto recognises it from the first record"""
    skip_bad: bool = False
    """skip invalid records (and report how many) instead of stopping at the first"""
    max_length: Optional[int] = None
    """longest sequence in tokens, prompt and response together; longer ones are truncated. none: 64 on the toy task, else the model's context up to 1024"""
    max_prompt_length: Optional[int] = None
    """longest prompt; a longer one keeps its last tokens (a conversation its system message and the end of its last user turn). none: max_length less one"""


TOY_PAIRS = ("out/pairs/pairs_train.jsonl", "out/pairs/pairs_val.jsonl")  # what `python sample.py --pairs` writes
TOY_PROMPTS = ("data/toy/prompts_train.jsonl", "data/toy/prompts_val.jsonl")  # what `python data.py` writes


def load_pairs(cfg: PairsConfig, tok: Tokenizer, chat_template: str, verbose: bool = True):
    """Tokenised training pairs, held-out pairs (as read), held-out tensors, and the tokenizer with
    the chat template they were rendered with (chat_template: --chat_template). Bad input raises
    DataError, before anything is written."""
    train_pairs = load_preferences(cfg.train_file, cfg.format, cfg.skip_bad)
    if cfg.val_file:
        val_pairs = load_preferences(cfg.val_file, cfg.format, cfg.skip_bad)
    else:
        train_pairs, val_pairs = hold_out(train_pairs, cfg.train_file, verbose)
    tok = tok.with_chat_template(chat_template, any(p.prompt_messages for p in train_pairs + val_pairs))
    train = tokenize_pairs(train_pairs, tok, cfg.max_length, cfg.max_prompt_length, verbose=verbose)
    val = tokenize_pairs(val_pairs, tok, cfg.max_length, cfg.max_prompt_length, verbose=verbose)
    return train, val_pairs, val, tok


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None, help="folder for the toy task files (default data/toy, or data/toy_chat with --chat)")
    parser.add_argument("--chat", action="store_true", help="write the SFT data as conversations (user: the review's "
                        "first words; assistant: the rest) with a tokenizer that knows the Zephyr template's markers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the toy review generator")
    parser.add_argument("--vocab_size", type=int, default=512, help="tokenizer vocabulary cap")
    parser.add_argument("--check", metavar="FILE", help="validate a JSONL file instead of writing the toy task")
    parser.add_argument("--kind", choices=["sft", "preference", "prompts"], default="sft", help="what --check expects")
    parser.add_argument("--format", default="auto", choices=sorted(set(SFT_FORMATS + PREFERENCE_FORMATS)),
                        help="record format for --check; auto recognises it from the first record")
    parser.add_argument("--skip_bad", action="store_true", help="with --check, skip and count bad records")
    args = parser.parse_args(argv)
    formats = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompts": ["auto"]}[args.kind]
    if args.format not in formats:
        parser.error(f"--format {args.format} is not a format of --kind {args.kind}")
    if args.check:
        try:
            if args.kind == "prompts":
                records = load_prompts(args.check, args.skip_bad)
            else:
                records = (load_sft if args.kind == "sft" else load_preferences)(args.check, args.format, args.skip_bad)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ok: {len(records)} {args.kind} records in {args.check}")
        return 0
    out_dir = args.out_dir or ("data/toy_chat" if args.chat else "data/toy")
    cfg = ToyConfig(seed=args.seed, vocab_size=args.vocab_size, chat=args.chat)
    prepare_toy_data(out_dir, cfg)
    tok = Tokenizer.load(os.path.join(out_dir, "tokenizer.model"))
    examples = load_sft(os.path.join(out_dir, "sft_train.jsonl"))
    if args.chat:
        tok = tok.with_chat_template("zephyr", chat_data=True)
        print(f"the first conversation as the model reads it: "
              f"{render(tok.chat_template, examples[0].messages, tok.special_tokens())!r}")
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
