"""Chat text for scoring: turn whatever a trainer sends into the (prompt, response) pair the scorer embeds.

Every RLHF protocol (chat scoring, OpenRLHF /get_reward, vLLM-style /classify, the TRL and verl adapters)
goes through this module, so one conversation gets one score whichever way it arrives:

- as message lists [{"role", "content"}]: rendered with the checkpoint's chat template when the bundle has
  one, else with the default renderer below;
- as text already templated by the *policy's* chat template (ChatML, Llama-3, Gemma, Phi/Zephyr,
  Llama-2/Mistral [INST]): parsed back into messages, then rendered as above;
- as plain strings: passed through, minus pad/BOS/EOS tokens at the edges.

Default renderer (no template in the bundle; MiniLM has none). It keeps a single-turn prompt byte-identical to
the plain string the head was trained on:
- one user turn -> its text, unchanged;
- several turns -> "User: ...\\n\\nAssistant: ...\\n\\nUser: ..." (role names capitalised, turns joined by a
  blank line);
- system messages are dropped unless `include_system=True`: policy templates inject boilerplate system
  prompts ("You are a helpful assistant.") that the trainer never wrote, and keeping them would make a
  templated OpenRLHF query score differently from the same conversation sent as messages by TRL;
- the response is the final assistant message's text.

No torch here (serving path). jinja2 is needed only when a bundle actually carries a chat template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

Message = Mapping[str, Any]

# Pad, BOS, EOS and end-of-turn tokens of common tokenizers. Stripped only at the edges of a text: inside a
# templated conversation the end-of-turn markers still delimit turns.
DEFAULT_STRIP_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|begin_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<s>",
    "</s>",
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "[PAD]",
    "[CLS]",
    "[SEP]",
)


class ChatFormatError(ValueError):
    """Input that cannot be turned into a (prompt, response) pair; the message says what is wrong."""


def message_text(message: Message) -> str:
    """The text of one message: a string, or OpenAI-style content parts [{"type": "text", "text": ...}]."""
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"a message must be an object with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ChatFormatError("only text content parts can be scored")
        return "".join(parts)
    raise ChatFormatError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def message_role(message: Message) -> str:
    role = message.get("role") if isinstance(message, Mapping) else None
    if not isinstance(role, str) or not role.strip():
        raise ChatFormatError("every message needs a non-empty string 'role'")
    role = role.strip().lower()
    return "assistant" if role == "model" else role


def strip_special(text: str, tokens: Sequence[str] = DEFAULT_STRIP_TOKENS) -> str:
    """Remove whitespace and any of `tokens` repeated at either end (left padding, BOS, EOS, right padding)."""
    start, end = 0, len(text)
    changed = True
    while changed:
        changed = False
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        for tok in tokens:
            if tok and text.startswith(tok, start, end):
                start += len(tok)
                changed = True
            if tok and end - start >= len(tok) and text.endswith(tok, start, end):
                end -= len(tok)
                changed = True
    return text[start:end]


# --- parsing text templated by a policy's chat template --------------------------------------------------------
#
# Hand-written scanners, not regular expressions: a lazy `.*?` up to an end marker that never comes rescans the
# rest of the text from every start marker, so "[INST]" repeated 6,666 times (40k characters) cost ~1 s of regex
# time. Every scanner below moves forward only, and every marker is searched with a _Finder that remembers its
# last hit, so a whole parse reads the text a constant number of times whatever it contains.

_Turn = tuple[str, str]  # (role, content)
_Found = list[tuple[int, int, list[_Turn]]]  # (start, end, turns) of each matched span, in order


class _Finder:
    """Next occurrence of one needle at or after a position, for positions that never decrease: O(len(text))
    over all calls together (the remembered hit stays valid until the position passes it)."""

    __slots__ = ("text", "needle", "hit")

    def __init__(self, text: str, needle: str) -> None:
        self.text, self.needle, self.hit = text, needle, -2  # -2: not searched yet; -1: no more occurrences

    def next(self, pos: int) -> int:
        if self.hit == -2 or (self.hit != -1 and self.hit < pos):
            self.hit = self.text.find(self.needle, pos)
        return self.hit


def _first(*hits: int) -> int:
    """The smallest non-negative position, or -1."""
    found = [h for h in hits if h >= 0]
    return min(found) if found else -1


def _content_end(text: str, close: int, close_len: int, nxt: int) -> tuple[int, int]:
    """(end of a turn's content, end of its span): at its end marker (at `close`, `close_len` long) if that comes
    before the next turn (at `nxt`), else where the next turn starts, else at the end of the text."""
    if close >= 0 and (nxt == -1 or close < nxt):
        return close, close + close_len
    e = len(text) if nxt == -1 else nxt
    return e, e


def _line_role_turns(start: str, end: str) -> Callable[[str], _Found | None]:
    """ChatML / Gemma: START role \\n content (END | before the next START | end of text). The role runs to the
    first newline or '<'; a role not followed by a newline (or the end of the text) is not a turn."""

    def parse(text: str) -> _Found | None:
        starts, ends = _Finder(text, start), _Finder(text, end)
        newlines, angles = _Finder(text, "\n"), _Finder(text, "<")
        found: _Found = []
        pos = 0
        while (s := starts.next(pos)) >= 0:
            r = s + len(start)
            stop = _first(newlines.next(r), angles.next(r))
            if stop == -1:  # the role runs to the end of the text: an open turn with no content
                found.append((s, len(text), [(text[r:], "")]))
                break
            if text[stop] != "\n":  # '<' inside the role: not a turn; the next START may be one
                pos = s + 1
                continue
            c = stop + 1
            e, pos = _content_end(text, ends.next(c), len(end), starts.next(c))
            found.append((s, pos, [(text[r:stop], text[c:e])]))
        return found or None

    return parse


def _header_turns(text: str) -> _Found | None:
    """Llama-3: <|start_header_id|>role<|end_header_id|>\\n\\ncontent(<|eot_id|> | before the next header | end)."""
    start, head_end, end = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    starts, head_ends, ends = _Finder(text, start), _Finder(text, head_end), _Finder(text, end)
    found: _Found = []
    pos = 0
    while (s := starts.next(pos)) >= 0:
        r = s + len(start)
        h = head_ends.next(r)
        if h == -1:  # no header end after this start, hence none after any later start either
            break
        c = h + len(head_end)
        for _ in range(2):  # at most two newlines after the header belong to it
            if text.startswith("\n", c):
                c += 1
        e, pos = _content_end(text, ends.next(c), len(end), starts.next(c))
        found.append((s, pos, [(text[r:h], text[c:e])]))
    return found or None


_PHI_ROLES = ("system", "user", "assistant")


def _phi_turns(text: str) -> _Found | None:
    """Phi-3 / Zephyr: <|role|>\\ncontent(<|end|> | </s> | before the next <|role|> | end), role in _PHI_ROLES."""
    markers = [(_Finder(text, f"<|{role}|>"), role) for role in _PHI_ROLES]
    ends = [(_Finder(text, tok), len(tok)) for tok in ("<|end|>", "</s>")]

    def next_marker(pos: int) -> tuple[int, str]:
        best, best_role = -1, ""
        for finder, role in markers:
            hit = finder.next(pos)
            if hit >= 0 and (best == -1 or hit < best):
                best, best_role = hit, role
        return best, best_role

    found: _Found = []
    pos = 0
    while True:
        s, role = next_marker(pos)
        if s == -1:
            break
        c = s + len(role) + 4
        if text.startswith("\n", c):
            c += 1
        nxt, _ = next_marker(c)
        close, close_len = -1, 0
        for finder, length in ends:
            hit = finder.next(c)
            if hit >= 0 and (close == -1 or hit < close):
                close, close_len = hit, length
        e, pos = _content_end(text, close, close_len, nxt)
        found.append((s, pos, [(role, text[c:e])]))
    return found or None


_SYS_RE = re.compile(r"\s*<<SYS>>\n?(?P<sys>.*?)\n?<</SYS>>\s*(?P<rest>.*)", re.DOTALL)  # anchored: one pass


def _inst_answer_end(text: str, a: int, nxt: int) -> int:
    """Where an [INST] answer starting at `a` stops: before `<s>`? whitespace* of the next [INST] at `nxt`."""
    if nxt == -1:
        return len(text)
    w = nxt
    while w > a and text[w - 1].isspace():
        w -= 1
    if w - 3 >= a and text.startswith("<s>", w - 3):
        w -= 3
    return w


def _inst_turns(text: str) -> _Found | None:
    """Llama-2 / Mistral: [INST] user [/INST] answer</s>[INST] ... with an optional <<SYS>> block."""
    starts, closes = _Finder(text, "[INST]"), _Finder(text, "[/INST]")
    found: _Found = []
    pos = 0
    while (s := starts.next(pos)) >= 0:
        u = s + len("[INST]")
        close = closes.next(u)
        if close == -1:  # no [/INST] after this [INST], hence none after any later one either
            break
        a = close + len("[/INST]")
        e = _inst_answer_end(text, a, starts.next(a))
        user = text[u:close]
        turns: list[_Turn] = []
        sys_match = _SYS_RE.match(user)
        if sys_match:
            turns.append(("system", sys_match["sys"]))
            user = sys_match["rest"]
        turns.append(("user", user))
        turns.append(("assistant", text[a:e]))
        found.append((s, e, turns))
        pos = e
    return found or None


# Each entry: (marker that must occur in the text, parser). An open turn (no end marker yet, e.g. the
# generation prompt "<|im_start|>assistant\n") runs to the next turn or the end of the text.
_MARKUPS: tuple[tuple[str, Callable[[str], _Found | None]], ...] = (
    ("<|im_start|>", _line_role_turns("<|im_start|>", "<|im_end|>")),
    ("<|start_header_id|>", _header_turns),
    ("<start_of_turn>", _line_role_turns("<start_of_turn>", "<end_of_turn>")),
    ("<|user|>", _phi_turns),
    ("[INST]", _inst_turns),
)


def parse_chat_markup(text: str, strip_tokens: Sequence[str] = DEFAULT_STRIP_TOKENS) -> list[dict[str, str]] | None:
    """Messages of a text templated by a known chat template, or None when it is not (plain text).

    A trailing assistant turn is kept even when empty: it is the generation prompt of a templated prompt, or
    the response of a templated prompt+response. Text outside the turns may only be whitespace and special
    tokens; anything else means the markup is not what it looks like, and the text is treated as plain.
    """
    for marker, parse in _MARKUPS:
        if marker not in text:
            continue
        found = parse(text)
        if not found:
            continue
        outside, pos = [], 0
        for start, end, _ in found:
            outside.append(text[pos:start])
            pos = end
        outside.append(text[pos:])
        if any(strip_special(gap, strip_tokens) for gap in outside):
            continue
        messages = []
        for _, _, turns in found:
            for role, content in turns:
                role = role.strip().lower()
                role = "assistant" if role == "model" else role
                messages.append({"role": role, "content": strip_special(content, strip_tokens)})
        return messages
    return None


# --- rendering ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is in the serve extra
        raise RuntimeError("this bundle has a chat template: rendering it needs jinja2 (pip install jinja2)") from e

    def raise_exception(message: str) -> None:
        raise ChatFormatError(f"chat template refused the conversation: {message}")

    # Same environment options as transformers' apply_chat_template, so the text matches the tokenizer's.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise RuntimeError(f"the bundle's chat template does not compile: {e}") from e


def _default_prompt(messages: Sequence[Message], include_system: bool) -> str:
    turns = [(message_role(m), message_text(m)) for m in messages]
    if not include_system:
        turns = [(r, t) for r, t in turns if r != "system"]
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in turns)


@dataclass(frozen=True)
class ChatRenderer:
    """Renders conversations the way the checkpoint expects; one instance per loaded bundle."""

    template: str | None = None
    include_system: bool = False
    strip_tokens: tuple[str, ...] = DEFAULT_STRIP_TOKENS
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        # A template that does not compile must stop the model from loading, not fail the first chat request.
        if self.template is not None:
            _compile_template(self.template)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        msgs = [{"role": message_role(m), "content": message_text(m)} for m in messages]
        try:
            return _compile_template(self.template).render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatFormatError:
            raise
        except Exception as e:  # a template bug on some input must be the caller's 4xx, not a crash
            raise ChatFormatError(f"chat template failed on this conversation: {e}") from e

    def prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text for the turns before the response (a generation prompt is added by templates)."""
        if not messages:
            return ""
        if self.template is None:
            return _default_prompt(messages, self.include_system)
        return self._render(messages, add_generation_prompt=True)

    def pair(self, messages: Sequence[Message]) -> tuple[str, str]:
        """(prompt, response) of a conversation whose last message is the assistant response to score."""
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
            raise ChatFormatError("a conversation must be a non-empty list of messages")
        last = messages[-1]
        if message_role(last) != "assistant":
            raise ChatFormatError("the last message of a conversation to score must have role 'assistant'")
        prompt = self.prompt(messages[:-1])
        response = message_text(last)
        if self.template is not None:
            full = self._render(messages, add_generation_prompt=False)
            # Templates that rewrite earlier turns (e.g. drop reasoning) break the prefix property; the raw
            # assistant text is then the honest response.
            if full.startswith(prompt):
                response = full[len(prompt) :]
        return prompt, strip_special(response, self.strip_tokens)

    def prompt_from_text(self, text: str) -> str:
        """Canonical prompt for a prompt string: templated text is parsed and re-rendered, plain text kept."""
        messages = parse_chat_markup(text, self.strip_tokens)
        if messages is None:
            return strip_special(text, self.strip_tokens)
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages = messages[:-1]  # the generation prompt
        return self.prompt(messages)

    def response_from_text(self, text: str) -> str:
        return strip_special(text, self.strip_tokens)

    def pair_from_text(self, text: str) -> tuple[str, str]:
        """(prompt, response) of one templated prompt+response string; plain text is all response."""
        messages = parse_chat_markup(text, self.strip_tokens)
        if messages is None or messages[-1]["role"] != "assistant":
            return "", strip_special(text, self.strip_tokens)
        return self.pair(messages)

    def prompt_any(self, prompt: str | Sequence[Message]) -> str:
        """A prompt given as a string (plain or templated) or as a list of messages."""
        if isinstance(prompt, str):
            return self.prompt_from_text(prompt)
        if isinstance(prompt, Sequence):
            return self.prompt(prompt)
        raise ChatFormatError("a prompt must be a string or a list of messages")

    def response_any(self, response: str | Message | Sequence[Message]) -> str:
        """A response given as a string, one assistant message, or a list of messages ending with it (TRL)."""
        if isinstance(response, str):
            return self.response_from_text(response)
        if isinstance(response, Mapping):
            return strip_special(message_text(response), self.strip_tokens)
        if isinstance(response, Sequence) and response:
            last = response[-1]
            if message_role(last) != "assistant":
                raise ChatFormatError("a completion given as messages must end with an 'assistant' message")
            return strip_special(message_text(last), self.strip_tokens)
        raise ChatFormatError("a response must be a string, an assistant message or a non-empty list of messages")


# --- splitting a prompt+response string by its known prompt (OpenRLHF queries) ---------------------------------

# Template markers skipped, like whitespace, when a query is matched against its prompt loosely: decoding with
# skip_special_tokens drops them from one side only, and templates differ in the newlines around them.
MARKUP_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)


@lru_cache(maxsize=8)
def _skip_pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = [re.escape(t) for t in sorted(set(tokens), key=len, reverse=True) if t]
    return re.compile("|".join([*alternatives, r"\s+"]))


def visible_text(text: str, tokens: tuple[str, ...]) -> tuple[str, list[int]]:
    """The text without whitespace and special tokens, and the index in `text` of every character kept."""
    chars: list[str] = []
    index: list[int] = []
    pos = 0
    for m in _skip_pattern(tokens).finditer(text):
        chars.append(text[pos : m.start()])
        index.extend(range(pos, m.start()))
        pos = m.end()
    chars.append(text[pos:])
    index.extend(range(pos, len(text)))
    return "".join(chars), index


def _response_only(rest: str, tokens: Sequence[str]) -> str:
    """The remainder after the prompt, minus a generation prompt the prompt string did not carry."""
    rest = strip_special(rest, tokens)
    turns = parse_chat_markup(rest, tokens)
    if turns is not None and len(turns) == 1 and turns[0]["role"] == "assistant":
        return turns[0]["content"]
    return rest


def split_query(query: str, prompt: str, strip_tokens: Sequence[str] = DEFAULT_STRIP_TOKENS) -> tuple[str, str]:
    """Split `query` (= prompt + response, templated, maybe padded) into (prompt, response) using `prompt`.

    Tried in order: exact prefix after stripping pad/BOS/EOS at the edges; prefix ignoring whitespace and
    special/markup tokens (templates and decoders disagree on both); the query's own chat markup, when its
    prompt turns carry the same text as `prompt`. Raises ChatFormatError when none applies.
    """
    tokens = tuple(strip_tokens)
    q, p = strip_special(query, tokens), strip_special(prompt, tokens)
    if q.startswith(p):
        return p, _response_only(q[len(p) :], tokens)
    skip = tokens + MARKUP_TOKENS
    pv, _ = visible_text(p, skip)
    qv, q_index = visible_text(q, skip)
    if pv and qv.startswith(pv):
        cut = q_index[len(pv) - 1] + 1
        return p, _response_only(q[cut:], tokens)
    turns = parse_chat_markup(q, tokens)
    if turns and turns[-1]["role"] == "assistant" and len(turns) > 1:
        prior = turns[:-1]
        without_system = [t for t in prior if t["role"] != "system"]
        candidates = ["".join(t["content"] for t in prior), "".join(t["content"] for t in without_system)]
        if pv in {visible_text(c, skip)[0] for c in candidates}:
            return p, turns[-1]["content"]
    raise ChatFormatError(f"query does not start with its prompt (prompt begins {p[:60]!r}, query begins {q[:60]!r})")
