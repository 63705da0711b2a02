"""Issue #15, items 2 and 3: what made a training run fail now answers 200, scored, with the change flagged.

Each trigger goes through the protocol it broke (real app, real MiniLM bundle, real embedded Redis, real HTTP).
Rewards are checked against /score of the canonical item, so "200" never hides a wrong reward.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.rlhf.test_protocols import PROMPT, RESPONSES, chatml_prompt, close, native
from tests.support import cpu_settings, serve_app

LONG_PROMPT = " ".join(f"Sentence {i} of a long story about colors and the sea." for i in range(60)) + " " + PROMPT
COMPARISONS = [
    {"prompt": PROMPT, "chosen": "Blue.", "rejected": "Red, the boldest color there is, bright and loud."},
    {"prompt": PROMPT, "chosen": "Green.", "rejected": "I would say a warm orange like a sunset over hills."},
]


def get_reward(url: str, body: dict, path: str = "/get_reward") -> dict:
    resp = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def population(url: str, prompt: str, response: str) -> float:
    return native(url, [(prompt, response, None)])[0]["reward"]


def flagged(url: str, route: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf'pal_rlhf_flagged_total\{{reason="{reason}",route="{re.escape(route)}"\}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def user_one(rm_url: str) -> str:
    """A user named "1" with fitted weights: a label true or 1.0 must not score as this user (#16 Low 10)."""
    resp = httpx.post(f"{rm_url}/users/1/adapt", json={"comparisons": COMPARISONS}, timeout=120)
    assert resp.status_code == 200, resp.text
    return "1"


# --- OpenRLHF /get_reward ------------------------------------------------------------------------------------------


def test_empty_query_list_gets_empty_rewards(rm_url: str) -> None:
    """OpenRLHF shards a batch over its --reward.remote_url servers; one sample over two sends one an empty list."""
    out = get_reward(rm_url, {"query": [], "prompts": [], "labels": []})
    assert out == {"rewards": [], "scores": [], "extra_logs": {"personalized": [], "truncated": [], "flagged": []}}


def test_left_truncated_query_scores_the_whole_prompt(rm_url: str) -> None:
    """OpenRLHF keeps prompt_token_ids[-max_prompt_length:]: the query starts inside the prompt."""
    prompt = chatml_prompt(LONG_PROMPT)
    before = flagged(rm_url, "/get_reward", "query_left_truncated")
    queries = [prompt[len(prompt) // 2 :] + r + "<|im_end|>" for r in RESPONSES]
    out = get_reward(rm_url, {"query": queries, "prompts": [prompt] * 3, "labels": ["user-0"] * 3})
    expected = [e["reward"] for e in native(rm_url, [(LONG_PROMPT, r, "user-0") for r in RESPONSES])]
    assert close(out["rewards"], expected)
    assert out["extra_logs"]["flagged"] == [1.0] * 3 and out["extra_logs"]["personalized"] == [1.0] * 3
    assert flagged(rm_url, "/get_reward", "query_left_truncated") == before + 3


def test_query_without_its_prompt_is_scored_from_its_own_markup(rm_url: str) -> None:
    query = chatml_prompt(PROMPT) + RESPONSES[1] + "<|im_end|>"
    out = get_reward(rm_url, {"query": [query], "prompts": ["An unrelated prompt."]})
    assert close(out["rewards"], [population(rm_url, PROMPT, RESPONSES[1])])
    assert out["extra_logs"]["flagged"] == [1.0]


@pytest.mark.parametrize(
    "label",
    [{"user": "user-0"}, 0.5, 1.0, True, ["user-0"], "x" * 513],
    ids=["dict", "float", "float-1.0", "bool", "list", "too-long"],
)
def test_label_that_is_no_user_id_gets_the_population_reward(rm_url: str, user_one: str, label: object) -> None:
    prompt = chatml_prompt(PROMPT)
    before = flagged(rm_url, "/get_reward", "label_not_a_user")
    out = get_reward(rm_url, {"query": [prompt + RESPONSES[0]], "prompts": [prompt], "labels": [label]})
    assert close(out["rewards"], [population(rm_url, PROMPT, RESPONSES[0])])
    assert out["extra_logs"]["personalized"] == [0.0] and out["extra_logs"]["flagged"] == [1.0]
    assert flagged(rm_url, "/get_reward", "label_not_a_user") == before + 1


def test_label_1_is_user_1_but_true_and_1_0_are_not(rm_url: str, user_one: str) -> None:
    prompt = chatml_prompt(PROMPT)
    body = {"query": [prompt + RESPONSES[2]] * 4, "prompts": [prompt] * 4, "labels": ["1", 1, True, 1.0]}
    out = get_reward(rm_url, body)
    assert out["extra_logs"]["personalized"] == [1.0, 1.0, 0.0, 0.0]
    user, pop = native(rm_url, [(PROMPT, RESPONSES[2], "1"), (PROMPT, RESPONSES[2], None)])
    assert close(out["rewards"], [user["reward"]] * 2 + [pop["reward"]] * 2)


def test_ground_truth_label_is_a_user_without_weights(rm_url: str) -> None:
    prompt = chatml_prompt(PROMPT)
    out = get_reward(rm_url, {"query": [prompt + "42"], "prompts": [prompt], "labels": ["The answer is 42"]})
    assert close(out["rewards"], [population(rm_url, PROMPT, "42")])
    assert out["extra_logs"]["personalized"] == [0.0] and out["extra_logs"]["flagged"] == [1.0]


def test_over_long_query_loses_its_start_and_is_flagged_truncated(rm_url: str) -> None:
    prompt = chatml_prompt(PROMPT)
    response = "Blue. " * 8000  # 48,000 characters: over 2 x PAL_MAX_TEXT_CHARS on its own
    out = get_reward(rm_url, {"query": [prompt + response], "prompts": [prompt], "labels": ["user-1"]})
    assert out["extra_logs"]["truncated"] == [1.0] and out["extra_logs"]["personalized"] == [1.0]


# --- user ids: any string up to 512 characters ------------------------------------------------------------------


@pytest.mark.parametrize(
    "user", ["team a/alice", "x" * 300, "ünï cødé {tag} *?", "/"], ids=["space-slash", "300-chars", "unicode", "slash"]
)
def test_any_user_id_adapts_scores_and_deletes(rm_url: str, user: str) -> None:
    from urllib.parse import quote

    path = f"{rm_url}/users/{quote(user, safe='')}"
    resp = httpx.post(f"{path}/adapt", json={"comparisons": COMPARISONS}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["user_id"] == user
    assert httpx.get(path).json()["user_id"] == user
    prompt = chatml_prompt(PROMPT)
    out = get_reward(rm_url, {"query": [prompt + RESPONSES[0]], "prompts": [prompt], "labels": [user]})
    item = {"prompt": PROMPT, "response": RESPONSES[0], "user_id": user}
    chat = httpx.post(f"{rm_url}/score/chat", json={"items": [item]})
    assert out["extra_logs"]["personalized"] == [1.0] and chat.json()["results"][0]["personalized"] is True
    assert close(out["rewards"], [chat.json()["results"][0]["reward"]])
    assert httpx.delete(path).status_code == 200
    again = get_reward(rm_url, {"query": [prompt + RESPONSES[0]], "prompts": [prompt], "labels": [user]})
    assert again["extra_logs"]["personalized"] == [0.0]


# --- /score/chat (TRL, verl adapters) and /classify ---------------------------------------------------------------


def test_over_long_response_is_cut_and_flagged_truncated(rm_url: str) -> None:
    items = [{"prompt": PROMPT, "response": "Blue. " * 4000, "user_id": "user-0"}]  # 24,000 characters
    out = httpx.post(f"{rm_url}/score/chat", json={"items": items}, timeout=60)
    assert out.status_code == 200, out.text
    result = out.json()["results"][0]
    assert result["truncated"] is True and result["personalized"] is True and "text_cut" in result["flags"]


def test_conversation_ending_with_a_tool_message_is_scored_up_to_the_last_assistant_turn(rm_url: str) -> None:
    call = {"role": "assistant", "content": RESPONSES[1], "tool_calls": [{"id": "1", "type": "function"}]}
    tool = {"role": "tool", "content": '{"color": "red"}', "tool_call_id": "1"}
    user = [{"role": "user", "content": PROMPT}]
    items = [
        {"prompt": user, "response": [call, tool], "user_id": "user-2"},
        {"messages": [*user, call, tool], "user_id": "user-2"},
        {"prompt": user, "response": [tool], "user_id": "user-2"},
    ]
    out = httpx.post(f"{rm_url}/score/chat", json={"items": items}, timeout=60)
    assert out.status_code == 200, out.text
    results = out.json()["results"]
    expected = native(rm_url, [(PROMPT, RESPONSES[1], "user-2")])[0]["reward"]
    assert close([r["reward"] for r in results[:2]], [expected, expected])
    assert results[0]["flags"] == ["trailing_turns_dropped"] and results[2]["flags"] == ["no_assistant_turn"]
    classify = httpx.post(f"{rm_url}/classify", json={"messages": [*user, call, tool]}).json()
    assert close([classify["data"][0]["probs"][0]], [population(rm_url, PROMPT, RESPONSES[1])])


@pytest.mark.parametrize("user_id", [{"id": "user-0"}, 2.5, True, "y" * 600], ids=["dict", "float", "bool", "long"])
def test_score_chat_user_that_is_no_user_id_gets_the_population(rm_url: str, user_id: object) -> None:
    item = {"prompt": PROMPT, "response": "Blue.", "user_id": user_id}
    out = httpx.post(f"{rm_url}/score/chat", json={"items": [item]})
    assert out.status_code == 200, out.text
    result = out.json()["results"][0]
    assert result["personalized"] is False and result["flags"] == ["label_not_a_user"]
    assert close([result["reward"]], [population(rm_url, PROMPT, "Blue.")])


def test_classify_over_long_input_is_scored(rm_url: str) -> None:
    out = httpx.post(f"{rm_url}/classify", json={"input": chatml_prompt(PROMPT) + "Blue. " * 8000}, timeout=60)
    assert out.status_code == 200, out.text


# --- server settings: how labels map to users, reward shaping -----------------------------------------------------


@pytest.fixture(scope="module")
def key_labels_url(bundle_b: Path, scorer_b, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = cpu_settings(
        bundle_b, tmp_path_factory.mktemp("rlhf-redis-key"), label_user="key", label_user_key="uid",
        reward_shaping="sigmoid"
    )
    yield from serve_app(settings, scorer_b)


def test_label_user_key_reads_the_user_from_dict_and_json_labels(key_labels_url: str) -> None:
    prompt = chatml_prompt(PROMPT)
    labels = [{"uid": "user-0", "answer": "42"}, '{"uid": "user-0"}', "user-0", {"answer": "42"}]
    out = get_reward(key_labels_url, {"query": [prompt + "Blue."] * 4, "prompts": [prompt] * 4, "labels": labels})
    assert out["extra_logs"]["personalized"] == [1.0, 1.0, 0.0, 0.0]
    assert all(0.0 < r < 1.0 for r in out["rewards"])  # PAL_REWARD_SHAPING=sigmoid
    body = {"query": [prompt + "Blue."], "prompts": [prompt]}
    raw = get_reward(key_labels_url, body, "/get_reward?shaping=raw")
    assert close(raw["rewards"], [population(key_labels_url, PROMPT, "Blue.")])


def test_label_modes_map_labels_to_users() -> None:
    from service.protocols.common import LABEL_IGNORED, LABEL_NOT_A_USER, user_from_label

    assert user_from_label("alice") == ("alice", None) and user_from_label(7) == ("7", None)
    assert user_from_label(None) == (None, None) and user_from_label("") == (None, None)
    for label in (True, False, 1.0, {"user_id": "alice"}, ["alice"], "a" * 513):
        assert user_from_label(label) == (None, LABEL_NOT_A_USER), label
    assert user_from_label("The answer is 42", "ignore") == (None, LABEL_IGNORED)
    assert user_from_label(None, "ignore") == (None, None)
    assert user_from_label({"uid": "bob"}, "key", "uid") == ("bob", None)
    assert user_from_label('{"uid": 5}', "key", "uid") == ("5", None)
    for label in ("bob", '{"uid": ', {"other": "bob"}, {"uid": True}, 3):
        assert user_from_label(label, "key", "uid") == (None, LABEL_NOT_A_USER), label
