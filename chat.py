"""
Chat templates: a conversation (a list of {"role", "content"} messages) rendered to the text a
chat model reads, and tokenised with labels on the assistant's tokens only.

A template is Jinja, as in a Hugging Face folder's `chat_template`. It is code from a downloaded
folder, so it runs in jinja2's immutable sandbox, with the settings transformers uses
(trim_blocks, lstrip_blocks, loop controls, a tojson that keeps non-ASCII, raise_exception), so a
conversation renders to the same text as `apply_chat_template`. The built-in Zephyr template
(Tunstall et al. 2023) is used when a model has none:

    <|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{reply}</s>\\n

with the model's eos in place of </s>. Its generation prompt is "<|assistant|>\\n".

Labels come from rendering prefixes of the conversation: assistant turn i is the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]). That needs a
template that renders a conversation's earlier turns the same whatever follows them; one that
does not (some strip earlier reasoning) is refused with a clear error.
"""
import json
from datetime import datetime
from functools import lru_cache

ROLES = ("system", "user", "assistant")

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)


class ChatError(ValueError):
    """A conversation the template cannot render, or a template that cannot be used."""


def _raise_exception(message):
    raise ChatError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template does not parse: {e}") from None


def render(template: str, messages: list[dict], special_tokens: dict[str, str], add_generation_prompt: bool = False) -> str:
    """The template applied to `messages`; special_tokens gives bos_token, eos_token, ... as text."""
    import jinja2
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except ChatError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
        raise ChatError(f"the chat template failed to render: {type(e).__name__}: {e}") from None


def assistant_spans(template: str, messages: list[dict], special_tokens: dict[str, str]):
    """The rendered conversation and the (start, end) character span of each assistant turn (what
    the template writes for it after the generation prompt)."""
    text = render(template, messages, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        done = render(template, messages[:i + 1], special_tokens)
        if message["role"] == "assistant":
            before = render(template, messages[:i], special_tokens, add_generation_prompt=True)
            if not done.startswith(before):
                raise ChatError(f"the chat template's generation prompt is not how it begins assistant turn {i}")
            spans.append((len(before), len(done)))
        if not text.startswith(done):
            raise ChatError(f"the chat template renders turn {i} differently when later turns follow it, "
                            "so prompts and responses cannot be cut apart")
    return text, spans


def encode_conversation(tok, messages: list[dict], max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether it carries loss: the tokens that
    start inside an assistant turn, every turn of a multi-turn conversation.

    Truncation keeps whole turns: a conversation longer than max_length ends with the last
    assistant turn that fits whole; if even the first does not, it is cut inside that turn. One
    whose first assistant turn starts past max_length is refused."""
    text, spans = assistant_spans(tok.chat_template, messages, tok.special_tokens())
    ids, starts = tok.encode_with_offsets(text)
    labelled = [any(a <= s < b for a, b in spans) for s in starts]
    if len(ids) > max_length:
        if not any(labelled[:max_length]):
            raise ChatError(f"the first assistant turn starts after {max_length} tokens (max_length)")
        turn_ends = [sum(s < end for s in starts) for _, end in spans]  # token index after each assistant turn
        cut = max([end for end in turn_ends if end <= max_length], default=max_length)
        ids, labelled = ids[:cut], labelled[:cut]
    return ids, labelled


def encode_prompt_response(tok, prompt_messages: list[dict], response: str, max_length: int,
                           max_prompt_length: int | None) -> tuple[list[int], int]:
    """Token ids of a prompt conversation followed by one assistant response, and the number of
    prompt tokens. The whole conversation is rendered and tokenised at once, so prompt + response
    is exactly the template applied to it; the response runs up to and including its eos, where
    generation stops (a template's text after the eos, such as Zephyr's newline, is left out).

    Truncation: a prompt longer than max_prompt_length (or leaving no room within max_length)
    loses its oldest turns, a leading system message kept, while a user turn remains; one whose
    last user turn alone is too long is refused. The response is then cut on the right."""
    special = tok.special_tokens()
    limit = min(max_prompt_length or max_length, max_length - 1)
    head = prompt_messages[:1] if prompt_messages[0]["role"] == "system" else []
    turns = prompt_messages[len(head):]
    while True:
        messages = head + turns
        prompt_text = render(tok.chat_template, messages, special, add_generation_prompt=True)
        text = render(tok.chat_template, messages + [{"role": "assistant", "content": response}], special)
        if not text.startswith(prompt_text):
            raise ChatError("the chat template's generation prompt is not how it begins the assistant's turn")
        ids, starts = tok.encode_with_offsets(text)
        n_prompt = sum(s < len(prompt_text) for s in starts)
        if n_prompt <= limit:
            break
        later = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        if not later:
            raise ChatError(f"the prompt's last user turn alone is {n_prompt} tokens, more than "
                            f"{limit} (max_prompt_length, and max_length less one response token)")
        turns = turns[later[0]:]
    if tok.eos_id in ids[n_prompt:]:
        ids = ids[:n_prompt + ids[n_prompt:].index(tok.eos_id) + 1]
    return ids[:max_length], n_prompt
