"""
Data: readers of JSONL and parquet that validate every record (SFT examples, preference pairs and
prompts, in the formats TRL and the Hugging Face hub use), tokenisation with labels, and collation
into padded tensors. The tokenizer is in tokenizer.py, the toy task in toy.py.

    python data.py --check FILE --kind preference   # validate a file, report the first bad record
"""
import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from chat import ROLES, ChatError, encode_conversation, encode_prompt_response, fit_prompt, prompt_limit
from files import DataError
from model import IGNORE_INDEX
from tokenizer import Tokenizer



# -----------------------------------------------------------------------------
# The longest record read (a JSONL line, or a parquet row as JSON): 4 MiB is about a million tokens, past
# every small model's context, while tokenizing a 100 MB line took minutes and 17 GB with a Hugging Face
# tokenizer.
MAX_RECORD_BYTES = 4 << 20

# Readers of JSONL and parquet. Every record is checked; a bad one raises DataError naming file, line
# (a parquet file's "row N", counted from 1 in that file) and field, or, with skip_bad=True, is dropped
# and counted.


@dataclass
class Example:
    """A prompt and its completion, a plain text (loss on all of it), or a conversation."""
    prompt: str
    completion: str
    where: str  # "file:line" (a parquet file's "file:row N"), for error messages
    messages: Optional[list[dict]] = None  # a conversation: loss on every assistant turn
    # a conversation's leading messages that carry no loss (a prompt-completion record's prompt)
    prompt_turns: int = 0
    # a {"text"} record: never rendered by a chat template, as TRL never templates plain text
    text: Optional[str] = None


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str
    # the conversation before the responses, if the record has one
    prompt_messages: Optional[list[dict]] = None


def read_records(path: str):
    """Yield (where, record) for every record of `path`, which may be a JSONL file (read_jsonl), a
    parquet file (read_table), a folder of one split's parquet files (Hub shards such as
    train-00000-of-00002.parquet, read in name order, which the zero-padded numbers make shard
    order), a quoted glob pattern such as "data/train-*.parquet" (the datasets library's
    data_files), its files in name order, or a folder that datasets' save_to_disk wrote."""
    if os.path.isfile(os.path.join(path, "state.json")):
        yield from read_saved_dataset(path)
        return
    if os.path.isdir(path):
        files = parquet_split(path)
    elif not os.path.exists(path) and any(c in path for c in "*?["):  # a pattern, not a name
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
    else:
        files = [path]
    for file in files:
        if file.endswith(".parquet"):
            yield from read_table(file, "parquet", parquet_batches)
        else:
            yield from read_jsonl(file)


# a Hub shard: NAME-00000-of-00002.parquet, or with a content hash after it, as older datasets wrote
# (UltraChat-200k's train_sft-00000-of-00003-a3ecf92756993583.parquet)
HUB_SHARD = re.compile(r"(.+)-\d+-of-\d+(-[0-9a-f]+)?\.parquet")


def parquet_split(folder: str) -> list[str]:
    """A folder's parquet files, in name order, refused with one line when they are several splits
    (the Hub's train-*.parquet and test-*.parquet side by side): training on both would be silent."""
    files = sorted(name for name in os.listdir(folder) if name.endswith(".parquet"))
    if not files:
        raise DataError(f"{folder}: no .parquet files in this folder (a Hub dataset keeps them in its data/ "
                        "folder), nor a datasets save_to_disk state.json")
    # each split's glob: NAME-*.parquet for a Hub shard, else the file itself
    splits = sorted({f"{shard[1]}-*.parquet" if (shard := HUB_SHARD.fullmatch(name)) else name
                     for name in files})
    if len(splits) > 1:
        raise DataError(f"{folder}: parquet files of {len(splits)} splits; name one with a quoted pattern: "
                        + " or ".join(f'"{os.path.join(folder, split)}"' for split in splits))
    return [os.path.join(folder, name) for name in files]


def too_long(where: str) -> DataError:
    return DataError(f"{where}: a record of more than {MAX_RECORD_BYTES} bytes (data.MAX_RECORD_BYTES), "
                     "far longer than any model's context")


def read_jsonl(path: str):
    """Yield (where, record) for each non-blank line of a JSONL file. A line that is not UTF-8
    or not a JSON object yields a DataError in place of the record, so a caller may skip it and
    go on. A UTF-8 byte-order mark (as some Windows tools write) is accepted."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for i, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), start=1):
            where = f"{path}:{i}"
            # refused before it is parsed or tokenized; the rest of the line skipped
            if len(raw) > MAX_RECORD_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                yield where, too_long(where)
                continue
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} "
                                       f"at byte {e.start + 1})")
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


# Parquet and Arrow: pyarrow is imported only for them, so a JSONL user never needs it.
ROWS_PER_BATCH = 256  # rows read and made Python dicts at a time, rather than a whole file at once


def import_pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def parquet_batches(pa, path: str):
    with pa.parquet.ParquetFile(path) as f:
        yield from f.iter_batches(batch_size=ROWS_PER_BATCH)


def arrow_stream_batches(pa, path: str):
    with pa.OSFile(path) as f, pa.ipc.open_stream(f) as reader:
        yield from reader


def read_saved_dataset(folder: str):
    """Yield (where, record) for each row of a folder that datasets' save_to_disk wrote: its
    state.json names the Arrow files (IPC stream format) in order. The names are untrusted: one
    that is not a file in the folder itself is refused, so nothing outside it is read."""
    state = os.path.join(folder, "state.json")
    try:
        with open(state, "rb") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a datasets state.json with '_data_files' ({e!r})") from None
    for name in names:
        file = os.path.join(folder, str(name))
        if os.path.dirname(os.path.realpath(file)) != os.path.realpath(folder):
            raise DataError(f"{state}: data file {name!r} is not in the folder")
        yield from read_table(file, "Arrow stream", arrow_stream_batches)


def read_table(path: str, kind: str, batches):
    """Yield ("FILE:row N", record) for each row of a table file (N counted from 1 in that file),
    from `batches(pyarrow, path)`, an iterator of its record batches. A row is the dict pyarrow's
    to_pylist makes (a list<struct> column becomes a list of dicts, as JSON reads it); a null
    column is a missing field, as the datasets library writes a JSON record without that key.
    A row longer than MAX_RECORD_BYTES as a JSON line yields a DataError in place of the record, as
    read_jsonl's long line does; a file pyarrow cannot read raises one."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    pa = import_pyarrow(path)
    rows = 0
    try:
        for batch in batches(pa, path):
            for row in batch.to_pylist():
                rows += 1
                where = f"{path}:row {rows}"
                # bytes and timestamps, which JSON never has, are measured as text
                if len(json.dumps(row, ensure_ascii=False, default=str).encode()) > MAX_RECORD_BYTES:
                    yield where, too_long(where)
                else:
                    yield where, {k: v for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a {kind} file, or a damaged one (pyarrow: {reason})") from None


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
            raise DataError(f"{where}: field '{field}[{j}].role': unknown role {m['role']!r} "
                            f"(expected {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt(record: dict, where: str) -> list[dict]:
    """ShareGPT: "conversations", a list of {"from": "human" | "gpt" | "system", "value"} turns, as
    {"role", "content"} messages; a top-level "system" string (LLaMA-Factory's) comes first."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations': expected a non-empty list of ShareGPT turns")
    messages = ([{"role": "system", "content": _text_field(record, "system", where)}]
                if record.get("system") else [])
    for j, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise DataError(f"{where}: field 'conversations[{j}]': expected ShareGPT "
                            f"{{\"from\", \"value\"}} strings")
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
        raise DataError(f"{where}: field 'rejected': its conversation differs from 'chosen' before the last "
                        "assistant turn")
    if len(chosen) > 1:
        prompt_messages = chosen[:-1]
    elif isinstance(record.get("prompt"), list):
        prompt_messages = _messages(record, "prompt", where)
    else:
        prompt_messages = [{"role": "user", "content": _text_field(record, "prompt", where)}]
    if prompt_messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the conversation before the responses does not end "
                        "with a user turn")
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
            raise DataError(f"{where}: field '{field}': empty response after the prompt both start with "
                            f"({chosen[:n]!r})")
    return chosen[:n], chosen[n:], rejected[n:]


def _sharegpt_pair(record: dict, where: str) -> tuple[list[dict], str, str]:
    """LLaMA-Factory's ShareGPT pairs: "conversations" ending in a human turn, and "chosen" and
    "rejected" each one {"from": "gpt", "value"} reply."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: field 'conversations': a ShareGPT conversation without 'chosen' and "
                        "'rejected' replies is SFT data, not a preference pair")
    prompt_messages = _sharegpt(record, where)
    if prompt_messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'conversations': last turn is not from the human")
    replies = []
    for field in ("chosen", "rejected"):
        reply = record[field]
        if not (isinstance(reply, dict) and reply.get("from") == "gpt"):
            raise DataError(f"{where}: field '{field}': expected a ShareGPT reply "
                            f"{{\"from\": \"gpt\", \"value\"}}")
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
        split = _ultrafeedback if fmt == "ultrafeedback" else _sharegpt_pair
        prompt_messages, chosen, rejected = split(record, where)
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
        return Example("", "", where, text=_text_field(record, "text", where))
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        messages = _messages(record, field, where) if fmt == "messages" else _sharegpt(record, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field '{field}': no assistant turn (nothing to learn from)")
        return Example("", "", where, messages)
    if fmt == "conversational_prompt_completion":
        prompt, completion = (_messages(record, f, where) for f in ("prompt", "completion"))
        if completion[0]["role"] != "assistant":
            raise DataError(f"{where}: field 'completion[0].role': expected 'assistant', "
                            f"got {completion[0]['role']!r}")
        return Example("", "", where, prompt + completion,
                       prompt_turns=len(prompt))  # loss on the completion's turns
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


SFT_FORMATS = ["auto", "prompt_completion", "text", "messages", "conversational_prompt_completion",
               "sharegpt"]
PREFERENCE_FORMATS = ["auto", "plain", "hh", "implicit", "ultrafeedback", "sharegpt"]


def _load(path: str, kind: str, fmt: str, skip_bad: bool, parse) -> list:
    records, skipped, first_error = [], 0, None
    for where, record in read_records(path):
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
    return [prompt for prompt, _ in load_prompt_records(path, skip_bad)]


def load_prompt_records(path: str, skip_bad: bool = False) -> list[tuple[str | list[dict], dict]]:
    """Prompts as load_prompts reads them, each with the record's other fields (what a reward
    function takes as keyword lists: an "answer" to check against)."""
    return _load(path, "prompts", "prompt", skip_bad, lambda record, fmt, where: (
        _parse_prompt(record, fmt, where), {k: v for k, v in record.items() if k != "prompt"}))


# -----------------------------------------------------------------------------
# Tokenisation, truncation and collation.
#
# Truncation, one rule for pairs, SFT records and PPO's prompts: the project's own, close to older
# TRL's DPO (TRL 1.16 has no prompt limit: it cuts the whole sequence keeping its start, and drops
# records whose prompt fills max_length). A sequence is [bos] + prompt + response + [eos] (bos where
# the tokenizer uses one). A prompt longer than max_prompt_length (unset: max_length less one, so a
# response keeps at least one token) keeps its last tokens, the ones nearest the response, bos kept;
# under a chat template it loses whole turns, its system message kept, then its last user turn's text
# is cut on the left (chat.fit_prompt). The response is then cut on the right to fit max_length
# (losing its eos). A {"text"} record has no prompt: it keeps its start. How many records were cut is
# printed once per dataset; a record that cannot fit at all is a DataError naming its file and line.


def encode_prompt(tok: Tokenizer, prompt: str | list[dict], limit: int) -> tuple[list[int], bool]:
    """A prompt's token ids as the model sees it (tok.encode_prompt) within `limit` tokens, and
    whether it was cut, by the rule above. Raises ChatError when a conversation cannot fit."""
    if tok.chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        messages, cut = fit_prompt(messages, lambda m: len(tok.encode_prompt(m)) <= limit, limit)
        return tok.encode_prompt(messages), cut
    ids = tok.encode_prompt(prompt)
    if len(ids) <= limit:
        return ids, False
    head = [tok.bos_id] * tok.add_bos
    return head + ids[len(ids) - limit + len(head):], True


def encode_example(tok: Tokenizer, prompt: str, response: str, max_length: int,
                   max_prompt_length: int | None, where: str,
                   prompt_messages: list[dict] | None = None) -> tuple[list[int], int, bool]:
    """Token ids of one sequence, the number of leading tokens that carry no loss, and whether
    truncation cut it."""
    if tok.chat_template:
        try:
            return encode_prompt_response(tok, prompt_messages or [{"role": "user", "content": prompt}],
                                          response, max_length, max_prompt_length)
        except ChatError as e:
            raise DataError(f"{where}: field 'prompt': {e}") from None
    prompt_ids, prompt_cut = encode_prompt(tok, prompt, prompt_limit(max_length, max_prompt_length))
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
            labels[i, :len(ids)] = torch.where(torch.tensor(loss_on, dtype=torch.bool),
                                               input_ids[i, :len(ids)], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_sft(tok: Tokenizer, e: Example, max_length: int, max_prompt_length: int | None):
    """Token ids of one SFT example, which tokens carry no loss (a count, or per token for a
    conversation), and whether truncation cut it."""
    if e.text is not None:  # plain text, templated or not: bos, the text, eos; cut on the right
        ids = [tok.bos_id] * tok.add_bos + tok.encode(e.text) + [tok.eos_id]
        return ids[:max_length], int(tok.add_bos), len(ids) > max_length
    if e.messages is None:
        return encode_example(tok, e.prompt, e.completion, max_length, max_prompt_length, e.where)
    if not tok.chat_template:
        raise DataError(f"{e.where}: field 'messages': a conversation needs a chat template "
                        "(--chat_template)")
    try:
        return encode_conversation(tok, e.messages, max_length, max_prompt_length, e.prompt_turns)
    except ChatError as err:
        raise DataError(f"{e.where}: field 'messages': {err}") from None


def report_cuts(records: list, cut: list[bool], max_length: int, max_prompt_length: int | None) -> None:
    """One line on stderr saying how many records truncation cut, so that limits too tight for the
    data show before training rather than as a worse model after it."""
    if any(cut):
        files = ", ".join(sorted({r.where.rsplit(":", 1)[0] for r in records}))
        limits = f"--max_length {max_length}" + (f" / --max_prompt_length {max_prompt_length}"
                                                 if max_prompt_length else "")
        print(f"note: {sum(cut)} of {len(records)} records in {files} were cut to fit {limits}",
              file=sys.stderr)


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
    encoded = [encode_example(tok, p.prompt, response, max_length, max_prompt_length, p.where,
                              p.prompt_messages)
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
    T = max(int(v[index].sum(1).max()) if len(index) else 1
            for k, v in tensors.items() if k.endswith("attention_mask"))
    return {k: (v[index, :T] if v.dim() == 2 else v[index]).to(device) for k, v in tensors.items()}


def real_tokens(tensors: dict[str, torch.Tensor], index: torch.Tensor) -> int:
    """Real (unpadded) tokens in rows `index`, over every attention mask (chosen and rejected)."""
    return int(sum(v[index].sum() for k, v in tensors.items() if k.endswith("attention_mask")))


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
    """preference pairs (plain, HH-RLHF, TRL implicit-prompt, UltraFeedback-binarized or ShareGPT), JSONL or
    parquet; empty: the toy task's out/pairs/pairs_train.jsonl (not with a Hugging Face model)"""
    val_file: str = ""
    """held-out preference pairs; empty: out/pairs/pairs_val.jsonl on the toy task, else the last 5% of
    --train_file"""
    format: Literal["auto", "plain", "hh", "implicit", "ultrafeedback", "sharegpt"] = "auto"
    """record format; auto recognises it from the first record"""
    skip_bad: bool = False
    """skip invalid records (and report how many) instead of stopping at the first"""
    max_length: Optional[int] = None
    """longest sequence in tokens, prompt and response together; longer ones are truncated. none: 64 on the
    toy task, else the model's context up to 1024"""
    max_prompt_length: Optional[int] = None
    """longest prompt; a longer one keeps its last tokens (a conversation its system message and the end of
    its last user turn). none: max_length less one"""


TOY_PAIRS = ("out/pairs/pairs_train.jsonl",
             "out/pairs/pairs_val.jsonl")  # what `python sample.py --pairs` writes
TOY_PROMPTS = ("data/toy/prompts_train.jsonl", "data/toy/prompts_val.jsonl")  # what `python toy.py` writes


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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="FILE", required=True,
                        help="the file to validate: JSONL, parquet, a folder of parquet shards or a quoted glob")
    parser.add_argument("--kind", choices=["sft", "preference", "prompts"], default="sft",
                        help="what the file holds")
    parser.add_argument("--format", default="auto", choices=sorted(set(SFT_FORMATS + PREFERENCE_FORMATS)),
                        help="record format; auto recognises it from the first record")
    parser.add_argument("--skip_bad", action="store_true", help="skip and count bad records")
    args = parser.parse_args(argv)
    formats = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompts": ["auto"]}[args.kind]
    if args.format not in formats:
        parser.error(f"--format {args.format} is not a format of --kind {args.kind}")
    try:
        if args.kind == "prompts":
            records = load_prompts(args.check, args.skip_bad)
        else:
            records = (load_sft if args.kind == "sft" else load_preferences)(
                args.check, args.format, args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: {len(records)} {args.kind} records in {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
