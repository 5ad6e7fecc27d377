"""
Chat templates: a conversation (a list of {"role", "content"} messages) rendered to the text a
chat model reads, and tokenised with labels on the assistant's tokens only.

A template is Jinja, as in a Hugging Face folder's `chat_template`. It is code from a downloaded
folder, so it runs in jinja2's immutable sandbox, with the settings transformers uses
(trim_blocks, lstrip_blocks, loop controls, a tojson that keeps non-ASCII, raise_exception), so a
conversation renders to the same text as `apply_chat_template`. The sandbox keeps a template
from Python's internals but not from using up time or memory, so a render is also bounded: it
stops after RENDER_SECONDS (a SIGALRM timer, on the main thread of a Unix process: a thread or
Windows gets no time bound), `*` and `**` refuse a result past MAX_CHARS items or MAX_INT_BITS
bits before computing it, `+` and `~` refuse one past MAX_CHARS (so a text cannot double in a
loop), and the output stops past MAX_CHARS. A filter or method call is refused before it runs
when it is given a number past MAX_CHARS (a width: `'a'|center(10**10)`), a format string with
such a width, or is a replace or join whose result would pass MAX_CHARS; its result is bounded
too.
Every failure, the template's own raise_exception included, is one ChatError line naming where
the template came from. The built-in Zephyr template (Tunstall et al. 2023) is used when a model
has none:

    <|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{reply}</s>\\n

with the model's eos in place of </s>. Its generation prompt is "<|assistant|>\\n".

Labels come from rendering the whole conversation once: assistant turn i starts where
render(messages[:i], add_generation_prompt=True) ends, and runs to the end of its text in the
whole rendering and the stop token after it. A template that rewrites earlier turns once later
ones follow (Qwen3's drops earlier reasoning) gets each turn labelled as the whole rendering
writes it.
"""
import functools
import json
import re
import signal
import threading
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

# A render's bounds. A real template renders a conversation in well under a millisecond, to about
# the length of its messages; module constants, so that tests can tighten them.
RENDER_SECONDS = 0.5  # per render (compiling included): a hostile template is refused within a second
MAX_CHARS = 1 << 24  # longest text or list a template may build, and longest rendering
MAX_INT_BITS = 1 << 16  # largest number `*` or `**` may compute


class ChatError(ValueError):
    """A conversation the template cannot render, or a template that cannot be used."""


class _Refused(Exception):
    """A template that ran into a bound or called raise_exception; render names its source."""


class _Timeout(BaseException):
    """Raised by the SIGALRM timer; a BaseException, so that no `except Exception` inside jinja2
    (constant folding catches everything) swallows it."""


def _raise_exception(message):
    raise _Refused(f"refused the conversation: {message}")


def _bounded(value):
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_CHARS:
        raise _Refused(f"builds a text or list of {len(value)} items, more than {MAX_CHARS} (chat.MAX_CHARS)")
    return value


def _bounded_result(visit):
    def visitor(self, node, frame):
        self.write("environment.bounded(")
        visit(self, node, frame)
        self.write(")")
    return visitor


class _CodeGenerator(CodeGenerator):
    """Compiles `a + b` and `a ~ b` to pass their result through environment.bounded: their
    operands are bounded, so the result is at most twice the bound, and a text doubled in a loop
    is refused before it outgrows memory (cheaper than intercepting `+` through call_binop)."""
    visit_Add = _bounded_result(CodeGenerator.visit_Add)
    visit_Concat = _bounded_result(CodeGenerator.visit_Concat)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with `*`, `**`, `%` and calls refused before they build
    something too large, and `+` and `~` just after."""
    intercepted_binops = frozenset(["*", "**", "%"])
    code_generator_class = _CodeGenerator
    bounded = staticmethod(_bounded)

    def call_binop(self, context, operator, left, right):
        if isinstance(left, int) and isinstance(right, int):
            bits = (right * left.bit_length() if operator == "**"
                    else left.bit_length() + right.bit_length())  # at most
            if bits > MAX_INT_BITS:
                raise _Refused(f"computes a number of more than {MAX_INT_BITS} bits (chat.MAX_INT_BITS)")
        elif operator == "%":  # a format string: its widths
            _check_call("%", (left,), {})
        elif operator == "*":  # a text or list repeated
            count, items = (left, right) if isinstance(left, int) else (right, left)
            if (isinstance(count, int) and isinstance(items, (str, list, tuple))
                    and count * len(items) > MAX_CHARS):
                raise _Refused(f"builds a text or list of {count * len(items)} items, more than {MAX_CHARS} "
                               "(chat.MAX_CHARS)")
        return self.binop_table[operator](left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # every method a template calls: 'a'.center(n), ...
        # the sandbox wraps str.format
        bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        _check_call(getattr(__obj, "__name__", "a call"),
                    (bound_to, *args) if isinstance(bound_to, str) else args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))


_WIDTH = re.compile(r"\d{8,}")  # a run of digits in a format string that may be a width past MAX_CHARS


def _check_call(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a filter or method call that would allocate past MAX_CHARS before it runs: a number
    past it (a width or count), a format string holding one, a replace or join whose result
    would be longer (their inputs are bounded; their product is not)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and arg > MAX_CHARS:
            raise _Refused(f"calls {name} with {arg}, more than {MAX_CHARS} (chat.MAX_CHARS)")
        if isinstance(arg, str) and any(int(w) > MAX_CHARS for w in _WIDTH.findall(arg)):
            raise _Refused(f"calls {name} with a format width of more than {MAX_CHARS} (chat.MAX_CHARS)")
    texts = [a for a in args if isinstance(a, str)]
    if name == "replace" and len(texts) >= 3:
        text, old, new = texts[:3]
        size = len(text) + (text.count(old) if old else len(text) + 1) * (len(new) - len(old))
    elif (name == "join" and len(args) >= 2 and isinstance(args[0], str)
          and isinstance(args[1], (list, tuple))):
        size = len(args[0]) * max(0, len(args[1]) - 1) + sum(len(x) for x in args[1] if isinstance(x, str))
    else:
        return
    if size > MAX_CHARS:
        raise _Refused(f"builds a text of {size} characters with {name}, more than {MAX_CHARS} "
                       "(chat.MAX_CHARS)")


def _bounded_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja2's pass_context marks
    def bounded(*args, **kwargs):
        _check_call(name, args, kwargs)
        return _bounded(fn(*args, **kwargs))
    return bounded


def _expire(signum, frame):
    raise _Timeout


def _timer_available() -> bool:
    """Whether a render can be bounded in time: SIGALRM reaches only the main thread of a Unix
    process, and only if no one else handles it. Our handler, once set, stays (setting it costs
    more than a render), as harmless as the default: a stray SIGALRM ends the process either way."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    handler = signal.getsignal(signal.SIGALRM)
    if handler == signal.SIG_DFL:
        signal.signal(signal.SIGALRM, handler := _expire)
    return handler is _expire


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, transformers' mark of the assistant's text (SmolLM3's
    template has it): rendered as its body, as apply_chat_template renders it. Labels do not need
    it (assistant_spans finds every turn)."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = (
        lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys))
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = False, source: str | None = None) -> str:
    """The template applied to `messages`; special_tokens gives bos_token, eos_token, ... as text.
    Any failure is a ChatError of one line naming `source`, where the template came from."""
    name = f"the chat template ({source})" if source else "the chat template"
    timed = _timer_available()
    try:
        try:
            # a timer signal, not checks in the sandbox's hooks: a loop over a range made earlier calls none
            if timed:
                signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
            parts, size = [], 0
            for part in _compile(template).generate(messages=messages,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **special_tokens):
                size += len(part)
                if size > MAX_CHARS:
                    raise _Refused(f"writes more than {MAX_CHARS} characters (chat.MAX_CHARS)")
                parts.append(part)
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return "".join(parts)
    except _Timeout:
        problem = f"took more than {RENDER_SECONDS:g} s to render (chat.RENDER_SECONDS)"
    except _Refused as e:
        problem = str(e)
    except jinja2.TemplateSyntaxError as e:
        problem = f"does not parse: {e.message} (line {e.lineno})"
    except Exception as e:  # a template is code: whatever it raises (undefined, sandbox, overflow) is
                            # its failure
        problem = f"failed to render: {type(e).__name__}: {e}"
    problem = " ".join(problem.split())  # one line, whatever the template's message holds
    raise ChatError(f"{name} {problem[:500]}{'...' if len(problem) > 500 else ''}") from None


def assistant_spans(tok, messages: list[dict]):
    """The conversation rendered once by tok's chat template, and the (start, end) character span of
    each assistant turn as that rendering writes it: from the end of the generation prompt before it
    (the conversation up to the turn, rendered with add_generation_prompt) to the end of its text
    (a reasoning block before the text included). A template may render a turn
    differently once later turns follow it (Qwen3's drops the reasoning block of every reply but the
    last): each turn is labelled as it appears in the whole conversation, as apply_chat_template's
    assistant mask is."""
    text = tok.render(messages)
    prompts = {i: tok.render(messages[:i], add_generation_prompt=True)
               for i, m in enumerate(messages) if m["role"] == "assistant"}
    spans = []
    for i, prompt in prompts.items():
        if not text.startswith(prompt):
            raise ChatError(f"the chat template's generation prompt is not how it begins assistant turn {i} "
                            "in the whole conversation")
        start = len(prompt)
        following = [len(p) for j, p in prompts.items() if j > i]
        region = text[start:following[0] if following else len(text)]
        content = messages[i]["content"]
        at = region.find(content)
        if at < 0:  # templates that trim a reply's whitespace (Llama 3's, Gemma's)
            content = content.strip()
            at = region.find(content)
        if at < 0:
            raise ChatError(f"the chat template does not write the text of assistant turn {i} as it is, "
                            "so its tokens cannot be found")
        spans.append((start, start + at + len(content)))
    return text, spans


def _keep_end(content: str, fits) -> str | None:
    """The longest end of `content` (which does not fit whole) for which fits(end) holds, by
    bisection over character offsets; None when even the empty string does not fit. Cutting a
    message's text, not its tokens, keeps the rendering exactly the template's. Fewer characters
    never need more tokens but for the tokenizer's merges at the cut, so the end found always fits,
    though it may be a few characters shorter than the longest that would."""
    if not fits(""):
        return None
    lo, hi = 0, len(content)  # content[lo:] does not fit, content[hi:] does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(content[mid:]) else (mid, hi)
    return content[hi:]


def _once_per_value(encode):
    """`encode` of a message list, computed once per distinct list: fit_prompt asks of the prompt
    it returns, which its caller then encodes again."""
    done = {}

    def encode_once(messages):
        key = json.dumps(messages, sort_keys=True)
        if key not in done:
            done[key] = encode(messages)
        return done[key]
    return encode_once


def fit_prompt(messages: list[dict], fits, limit: int) -> tuple[list[dict], bool]:
    """A prompt conversation (its messages up to the reply, the last a user turn) cut until
    fits(messages) holds, and whether it was cut: the one truncation rule of every prompt under a
    chat template (a pair's, an SFT conversation's before its first labelled reply, PPO's). The
    oldest turns go first, a leading system message kept, while a later user turn remains; then the
    last user turn's text is cut on the left, its end (nearest the reply) kept. Only a prompt too
    long even with that turn emptied is refused (ChatError, naming `limit`, the tokens fits allows).

    This is the project's own rule, close to older TRL's DPO (a max_prompt_length, the prompt kept
    from its end); TRL 1.16 has no prompt limit: it cuts the whole sequence keeping its start, and
    drops records whose prompt fills max_length."""
    if fits(messages):
        return messages, False
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while not fits(head + turns) and (later := [i for i, m in enumerate(turns)
                                                if m["role"] == "user" and i > 0]):
        turns = turns[later[0]:]
    if fits(head + turns):
        return head + turns, True
    if not turns or turns[-1]["role"] != "user":
        raise ChatError(f"the prompt is longer than {limit} tokens and ends in no user turn that could "
                        "be cut")
    with_user = lambda content: [*head, *turns[:-1], {**turns[-1], "content": content}]  # noqa: E731
    content = _keep_end(turns[-1]["content"], lambda c: fits(with_user(c)))
    if content is None:
        raise ChatError(f"the prompt is longer than {limit} tokens (max_prompt_length, and max_length "
                        "less one response token) even with its last user turn emptied")
    return with_user(content), True


def prompt_limit(max_length: int, max_prompt_length: int | None) -> int:
    """The most tokens a prompt may keep: max_prompt_length, and room for one response token."""
    return min(max_prompt_length or max_length, max_length - 1)


def encode_conversation(tok, messages: list[dict], max_length: int, max_prompt_length: int | None = None,
                        prompt_turns: int = 0) -> tuple[list[int], list[bool], bool]:
    """Token ids of a whole conversation, per token whether it carries loss (the tokens that start
    inside an assistant turn, every turn of a multi-turn conversation after the first prompt_turns
    messages, up to and including the turn's stop token: the template's text after it, such as a
    newline, is never generated), and whether truncation cut anything.

    Truncation: the messages before the first labelled reply are a prompt, cut by fit_prompt to
    prompt_limit tokens; then a conversation longer than max_length ends with the last labelled
    turn that fits whole, or, if even the first does not, inside it."""
    reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= prompt_turns)

    @_once_per_value
    def encode(prompt):  # the conversation with `prompt` before its first labelled reply
        conversation = prompt + messages[reply:]
        text, spans = assistant_spans(tok, conversation)
        turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        spans = [span for span, i in zip(spans, turns) if i >= len(prompt)]
        ids, starts = tok.encode_with_offsets(text)
        labelled, turn_ends = [False] * len(ids), []
        for a, b in spans:  # a turn's tokens, and the stop token right after them (what generation emits)
            end = sum(s < a for s in starts)  # the token index after the turn
            for j in (j for j, s in enumerate(starts) if a <= s < b or s == b and ids[j] in tok.stop_ids):
                labelled[j], end = True, j + 1
                if ids[j] in tok.stop_ids:
                    break
            turn_ends.append(end)
        return ids, turn_ends, labelled

    def n_prompt(prompt):  # tokens before the first labelled one
        labelled = encode(prompt)[2]
        return next((j for j, on in enumerate(labelled) if on), len(labelled))

    limit = prompt_limit(max_length, max_prompt_length)
    prompt, cut = (fit_prompt(messages[:reply], lambda p: n_prompt(p) <= limit, limit) if reply
                   else ([], False))
    ids, turn_ends, labelled = encode(prompt)
    if len(ids) > max_length:
        cut = True
        end = max([end for end in turn_ends if end <= max_length], default=max_length)
        ids, labelled = ids[:end], labelled[:end]
    return ids, labelled, cut


def encode_prompt_response(tok, prompt_messages: list[dict], response: str, max_length: int,
                           max_prompt_length: int | None) -> tuple[list[int], int, bool]:
    """Token ids of a prompt conversation followed by one assistant response, the number of prompt
    tokens, and whether truncation cut anything. The whole conversation is rendered and tokenised
    at once, so prompt + response is exactly the template applied to it; the response runs up to
    and including its first stop token (eos, or the template's end-of-turn token such as ChatML's
    <|im_end|>), where generation stops (a template's text after it, such as a newline, is left out).
    The prompt is cut by fit_prompt to prompt_limit tokens, then the response on the right."""
    @_once_per_value
    def encode(messages):
        prompt_text = tok.render(messages, add_generation_prompt=True)
        text = tok.render(messages + [{"role": "assistant", "content": response}])
        if not text.startswith(prompt_text):
            raise ChatError("the chat template's generation prompt is not how it begins the assistant's turn")
        ids, starts = tok.encode_with_offsets(text)
        return ids, sum(s < len(prompt_text) for s in starts)

    limit = prompt_limit(max_length, max_prompt_length)
    prompt, cut = fit_prompt(prompt_messages, lambda p: encode(p)[1] <= limit, limit)
    ids, n_prompt = encode(prompt)
    stops = [j for j in range(n_prompt, len(ids)) if ids[j] in tok.stop_ids]
    if stops:
        ids = ids[:stops[0] + 1]
    return ids[:max_length], n_prompt, cut or len(ids) > max_length
