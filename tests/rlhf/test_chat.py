"""Chat rendering, templated-text parsing, pad stripping and OpenRLHF query splitting (models.chat)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.chat import ChatFormatError, ChatRenderer, parse_chat_markup, split_query, strip_special

QWEN_SYSTEM = "You are a helpful assistant."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def llama3(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in messages
    )
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else "")


def gemma(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    role = {"user": "user", "assistant": "model"}
    text = "<bos>" + "".join(f"<start_of_turn>{role[r]}\n{c}<end_of_turn>\n" for r, c in messages)
    return text + ("<start_of_turn>model\n" if generation_prompt else "")


def phi3(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|{r}|>\n{c}<|end|>\n" for r, c in messages)
    return text + ("<|assistant|>\n" if generation_prompt else "")


def mistral(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    text = "<s>"
    for r, c in messages:
        text += f"[INST] {c} [/INST]" if r == "user" else f" {c}</s>"
    return text


TEMPLATES = [chatml, llama3, gemma, phi3, mistral]


# --- default rendering -------------------------------------------------------------------------------------------


def test_single_user_turn_renders_as_its_plain_text() -> None:
    r = ChatRenderer()
    conv = [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Simmer 9 min."}]
    assert r.pair(conv) == ("How do I boil an egg?", "Simmer 9 min.")


def test_system_messages_dropped_by_default_kept_on_request() -> None:
    conv = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert ChatRenderer().pair(conv) == ("Hi", "Hello")
    assert ChatRenderer(include_system=True).pair(conv) == ("System: Be terse.\n\nUser: Hi", "Hello")


def test_multi_turn_prompt_keeps_roles_and_order() -> None:
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert ChatRenderer().pair(conv) == ("User: a\n\nAssistant: b\n\nUser: c", "d")


def test_content_parts_and_eos_in_response() -> None:
    conv = [
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": "Hi!</s>"},
    ]
    assert ChatRenderer().pair(conv) == ("Hello", "Hi!")


@pytest.mark.parametrize(
    ("conv", "fragment"),
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "q"}], "assistant"),
        ([{"content": "q"}, {"role": "assistant", "content": "a"}], "role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant"}], "text"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content"),
    ],
)
def test_malformed_conversations_raise_with_a_reason(conv: list, fragment: str) -> None:
    with pytest.raises(ChatFormatError, match=fragment):
        ChatRenderer().pair(conv)


# --- template rendering ------------------------------------------------------------------------------------------


def test_checkpoint_template_renders_prompt_and_response() -> None:
    r = ChatRenderer(template=CHATML)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt, response = r.pair(conv)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Hello"  # the template's <|im_end|> is stripped like an EOS from a decoded query


def test_template_raise_exception_is_a_format_error() -> None:
    r = ChatRenderer(template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatFormatError, match="roles must alternate"):
        r.pair([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


@pytest.mark.parametrize("template", [None, CHATML])
@pytest.mark.parametrize("policy_template", TEMPLATES)
def test_templated_text_and_messages_render_identically(template: str | None, policy_template) -> None:
    """A prompt templated by the policy's template renders like the same conversation sent as messages."""
    r = ChatRenderer(template=template)
    turns = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")]
    text = policy_template(turns, generation_prompt=True)
    assert r.prompt_from_text(text) == r.prompt([{"role": ro, "content": c} for ro, c in turns])


def test_qwen_injected_system_prompt_does_not_change_the_prompt() -> None:
    text = chatml([("system", QWEN_SYSTEM), ("user", "Hi")], generation_prompt=True)
    assert ChatRenderer().prompt_from_text(text) == "Hi"


@pytest.mark.parametrize("policy_template", TEMPLATES)
def test_parse_markup_recovers_turns(policy_template) -> None:
    turns = [("user", "line one\nline two"), ("assistant", "answer")]
    parsed = parse_chat_markup(policy_template(turns, generation_prompt=False))
    assert parsed == [{"role": r, "content": c} for r, c in turns]


def test_plain_text_mentioning_markup_stays_plain() -> None:
    text = "How do I print <|im_start|> in Python?"
    assert parse_chat_markup(text) is None
    assert ChatRenderer().prompt_from_text(text) == text
    assert ChatRenderer().pair_from_text(text) == ("", text)


# --- pad/EOS stripping ---------------------------------------------------------------------------------------------


def test_strip_special_removes_runs_at_both_edges_only() -> None:
    assert strip_special("<pad><pad> <s>Hello <|im_end|> world</s><|endoftext|>\n") == "Hello <|im_end|> world"
    assert strip_special("PAD", ["PAD"]) == ""
    assert strip_special("plain", ["<x>"]) == "plain"


# --- query splitting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy_template", TEMPLATES)
def test_split_padded_templated_query(policy_template) -> None:
    prompt = policy_template([("user", "Name a color.")], generation_prompt=True)
    if policy_template is mistral:
        query = prompt + " Blue.</s>"
    else:
        query = "<|endoftext|><|endoftext|>" + prompt + "Blue.<|im_end|><|eot_id|></s><pad><pad>"
    got_prompt, response = split_query(query, prompt)
    assert response == "Blue."
    assert ChatRenderer().prompt_from_text(got_prompt) == "Name a color."


def test_split_when_decoder_dropped_special_tokens() -> None:
    prompt = chatml([("system", QWEN_SYSTEM), ("user", "Name a color.")], generation_prompt=True)
    query = "system\nYou are a helpful assistant.\nuser\nName a color.\nassistant\nBlue."
    assert split_query(query, prompt)[1] == "Blue."


def test_split_with_raw_prompt_and_templated_query() -> None:
    query = chatml([("user", "Name a color."), ("assistant", "Blue.")], generation_prompt=False)
    assert split_query(query, "Name a color.") == ("Name a color.", "Blue.")


def test_split_when_prompt_lacks_the_generation_prompt() -> None:
    prompt = chatml([("user", "Name a color.")], generation_prompt=False)
    query = prompt + "<|im_start|>assistant\nBlue.<|im_end|>"
    assert split_query(query, prompt)[1] == "Blue."


def test_split_whitespace_differences() -> None:
    assert split_query("Q:  what?\n\n A: yes", "Q: what?\n")[1] == "A: yes"


def test_split_failure_is_a_clear_error() -> None:
    with pytest.raises(ChatFormatError, match="does not start with its prompt"):
        split_query("Completely different text", "Name a color.")


def test_empty_response_is_allowed() -> None:
    assert split_query("Name a color.</s>", "Name a color.") == ("Name a color.", "")


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>[]|"), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(user=_text.filter(lambda s: s.strip()), answer=_text.filter(lambda s: s.strip()), pads=st.integers(0, 3))
def test_split_recovers_any_response(user: str, answer: str, pads: int) -> None:
    prompt = chatml([("user", user)], generation_prompt=True)
    query = "<pad>" * pads + prompt + answer + "<|im_end|>" + "<pad>" * pads
    got_prompt, response = split_query(query, prompt)
    assert response == answer.strip()
    assert ChatRenderer().prompt_from_text(got_prompt) == user.strip()
