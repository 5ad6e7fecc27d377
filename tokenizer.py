"""
The tokenizer: text to token ids and back with a model's special ids, from a sentencepiece model
(the toy task's, Llama-2's) or a Hugging Face tokenizer.json, and its chat template hook-up (the
template is rendered by chat.py). It does not read model folders (hf.py) or data files (data.py).
"""
import inspect
import io
import os
import re

import sentencepiece as spm

from chat import MAX_CHARS, ZEPHYR_TEMPLATE, ChatError, render
from files import DataError, write_atomic



class Tokenizer:
    """Text to token ids and back, with the special ids a model was trained with. Two backends:
    a sentencepiece model (the toy task's, and Llama-2, TinyLlama, Mistral's `tokenizer.model`)
    or a Hugging Face `tokenizer.json` (GPT-2, SmolLM2, Qwen2) read by the `tokenizers` library.
    The toy tokenizer has byte fallback, so any text encodes and `decode(encode(text)) == text`
    exactly (no normalisation, whitespace kept)."""

    TOY_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)  # the toy tokenizer's special pieces
    # one piece each in the chat toy's tokenizer
    CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "\n"]

    def __init__(self, kind: str, data: bytes | str, bos_id: int | None, eos_id: int, pad_id: int,
                 add_bos: bool = True, chat_template: str | None = None, eos_ids: list[int] | None = None,
                 template_source: str | None = None):
        self.kind, self.data = kind, data  # data travels inside checkpoints, so a checkpoint samples alone
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # every id the model may end with (generation_config's list)
        self.eos_ids = sorted({eos_id, *(eos_ids or ())})
        self.add_bos = add_bos and bos_id is not None  # whether a prompt starts with bos
        # Jinja source; when set, every prompt is a user turn of a conversation
        self.chat_template = chat_template
        # where the template came from (a file, a flag), named in its errors
        self.template_source = template_source
        # why a folder's own template was left out (hf.load_tokenizer), said where a run asks for it
        self.template_problem = None
        if kind == "sentencepiece":
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            self.vocab_size = self.sp.get_piece_size()
            self.unk_id = self.sp.unk_id()
            # control pieces (<s>, </s>, ...) written in a template's text are those tokens, as in
            # transformers
            controls = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
            self._controls = controls
            longest_first = sorted(controls, key=len, reverse=True)
            self._control_re = re.compile("|".join(re.escape(p) for p in longest_first) or "(?!)")
        else:
            from tokenizers import Tokenizer as HFTokenizer  # only for Hugging Face folders
            self.hf = HFTokenizer.from_str(data)
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.unk_id = None
        self.end_of_turn_id = self._end_of_turn() if chat_template else None
        self.stop_ids = sorted({*self.eos_ids,
                                *([self.end_of_turn_id] if self.end_of_turn_id is not None else [])})
        # never decoded to text
        self.special_ids = {i for i in (bos_id, pad_id, *self.stop_ids) if i is not None}

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
        try:
            spm.SentencePieceTrainer.train(
                input=text_file, model_writer=proto, vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, hard_vocab_limit=False, normalization_rule_name="identity",
                remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **cls.TOY_IDS, **extra,
            )
        except RuntimeError as e:  # a vocabulary below the 256 byte pieces and the text's characters
            reason = str(e).split("] ")[-1].split(" Increase")[0]
            raise DataError(f"--vocab_size {vocab_size}: sentencepiece cannot train on this text: {reason}") from None
        return cls.toy(proto.getvalue())

    def state(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain values for a checkpoint."""
        return dict(kind=self.kind, data=self.data, bos_id=self.bos_id, eos_id=self.eos_id,
                    pad_id=self.pad_id, add_bos=self.add_bos, chat_template=self.chat_template,
                    eos_ids=self.eos_ids)

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
        if "Hi" not in before:  # a prompt rendered to nothing (or without its text) samples from nothing
            source = f" ({self.template_source})" if self.template_source else ""
            raise DataError(f"the chat template{source} renders a test prompt without its text: "
                            f"the user turn 'Hi' with the generation prompt became {before[:100]!r}")
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
        if choice == "auto" and self.template_problem:
            raise DataError(f"{self.template_problem}; --chat_template none (or zephyr, or a Jinja file) "
                            "runs without it")
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
                    template, source = f.read(MAX_CHARS + 1), f"--chat_template {choice}"
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"--chat_template {choice}: cannot be read as UTF-8 text ({e})") from None
            if len(template) > MAX_CHARS:  # the bound on any text a template builds bounds its source too
                raise DataError(f"--chat_template {choice}: more than {MAX_CHARS} characters "
                                "(chat.MAX_CHARS)")
        if chat_data and template is None:
            raise DataError("the data holds conversations but --chat_template none renders none")
        return Tokenizer(**{**self.state(), "chat_template": template}, template_source=source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages`, with this tokenizer's special tokens."""
        return render(self.chat_template, messages, self.special_tokens(), add_generation_prompt,
                      self.template_source)

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
        outside = [i for i in (tok.bos_id, tok.pad_id, *tok.eos_ids)
                   if i is not None and not 0 <= i < tok.vocab_size]
        if outside:
            raise DataError(f"{where}: special token ids {outside} lie outside the tokenizer's "
                            f"{tok.vocab_size} tokens")
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
