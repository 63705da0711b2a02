"""Each RLHF protocol against the running app (real MiniLM bundle, real embedded Redis, real HTTP).

The invariant under test: one conversation gets one reward whichever protocol carries it, and it is the
reward /score gives the canonical (prompt, response, user).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import httpx
import pytest

from service.adapters.trl import make_trl_reward_func
from service.adapters.verl import make_compute_score
from service.client import PalClient

SEEN_USERS = ["user-0", "user-1", "user-2", "user-3"]  # the random checkpoint's users (tests.scorer.factory)
QWEN_SYSTEM = "You are a helpful assistant."
PROMPT = "Name a color."
RESPONSES = ["Blue.", "I like red a lot.", "Green, like grass in spring."]


def chatml_prompt(user_text: str, system: str | None = QWEN_SYSTEM) -> str:
    sys = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys}<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def native(url: str, items: list[tuple[str, str, str | None]]) -> list[dict]:
    body = {"items": [{"prompt": p, "response": r, "user_id": u} for p, r, u in items]}
    resp = httpx.post(f"{url}/score", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5) for x, y in zip(a, b, strict=True))


# --- OpenRLHF /get_reward ------------------------------------------------------------------------------------------


def test_get_reward_templated_padded_queries_match_score(rm_url: str) -> None:
    users = [None, "user-0", "user-1"]
    items = [(PROMPT, r, u) for u in users for r in RESPONSES]
    prompt = chatml_prompt(PROMPT)
    body = {
        "query": ["<|endoftext|>" * 3 + prompt + r + "<|im_end|>" + "<|endoftext|>" * 2 for _, r, _ in items],
        "prompts": [prompt] * len(items),
        "labels": [u for _, _, u in items],
    }
    resp = httpx.post(f"{rm_url}/get_reward", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    expected = native(rm_url, items)
    assert close(out["rewards"], [e["reward"] for e in expected])
    assert out["scores"] == out["rewards"]
    assert out["extra_logs"]["personalized"] == [0.0] * 3 + [1.0] * 6
    assert len(out["extra_logs"]["truncated"]) == len(items)
    assert resp.headers["x-model-version"]


def test_get_reward_single_item_strings_and_no_prompts(rm_url: str) -> None:
    query = chatml_prompt(PROMPT, system=None) + RESPONSES[0] + "<|im_end|>"
    one = httpx.post(f"{rm_url}/get_reward", json={"query": query, "labels": "user-2"}).json()
    expected = native(rm_url, [(PROMPT, RESPONSES[0], "user-2")])[0]["reward"]
    assert close(one["rewards"], [expected])


def test_get_reward_is_idempotent_and_stateless(rm_url: str) -> None:
    body = {"query": [PROMPT + " " + r for r in RESPONSES], "prompts": [PROMPT] * 3, "labels": ["fresh-user"] * 3}
    first = httpx.post(f"{rm_url}/get_reward", json=body).json()
    for _ in range(2):
        assert httpx.post(f"{rm_url}/get_reward", json=body).json() == first
    assert first["extra_logs"]["personalized"] == [0.0] * 3
    assert httpx.get(f"{rm_url}/users/fresh-user").status_code == 404  # scoring stored nothing


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        # Only malformed requests; what an RLHF loop sends in good faith is scored (tests/rlhf/test_never_break.py).
        ({"query": ["a b", "c d"], "prompts": ["a"]}, 422, "'prompts' has 1 entries"),
        ({"query": ["a b", "c d"], "labels": ["u"]}, 422, "'labels' has 1 entries"),
        ({"query": [1, 2]}, 422, "query"),
        ({"prompts": ["a"]}, 422, "query"),
        ({"query": ["x"] * 1025}, 413, "PAL_MAX_ITEMS_PER_REQUEST"),
    ],
)
def test_get_reward_malformed_input_is_a_clear_4xx(rm_url: str, body: dict, status: int, fragment: str) -> None:
    resp = httpx.post(f"{rm_url}/get_reward", json=body)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["detail"]


def test_not_json_is_422(rm_url: str) -> None:
    for path in ("/get_reward", "/classify", "/score/chat"):
        resp = httpx.post(f"{rm_url}{path}", content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 422, (path, resp.text)


# --- vLLM-style /classify --------------------------------------------------------------------------------------------


def test_classify_gives_population_reward_of_rendered_conversation(rm_url: str) -> None:
    conv_text = chatml_prompt(PROMPT) + RESPONSES[1] + "<|im_end|>\n"
    resp = httpx.post(f"{rm_url}/classify", json={"model": "pal", "input": [conv_text, "just a response"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    expected = native(rm_url, [(PROMPT, RESPONSES[1], None), ("", "just a response", None)])
    assert close([d["probs"][0] for d in out["data"]], [e["reward"] for e in expected])
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["num_classes"] == 1 for d in out["data"])
    assert out["object"] == "list" and out["model"] == "pal" and out["id"]
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"]


def test_classify_single_string_messages_and_activation(rm_url: str) -> None:
    conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSES[2]}]
    raw = httpx.post(f"{rm_url}/classify", json={"input": chatml_prompt(PROMPT) + RESPONSES[2]}).json()
    by_messages = httpx.post(f"{rm_url}/classify", json={"messages": conv}).json()
    many = httpx.post(f"{rm_url}/classify", json={"messages": [conv, conv]}).json()
    squashed = httpx.post(f"{rm_url}/classify", json={"messages": conv, "activation": True}).json()
    r = raw["data"][0]["probs"][0]
    assert close([by_messages["data"][0]["probs"][0]], [r])
    assert close([d["probs"][0] for d in many["data"]], [r, r])
    assert close([squashed["data"][0]["probs"][0]], [1 / (1 + math.exp(-r))])


def test_classify_accepts_verls_reward_loop_payload(rm_url: str) -> None:
    """verl's disrm reward loop: chat rendered by the RM tokenizer (BOS removed), activation off, last prob read."""
    rm_prompt = chatml_prompt(PROMPT, system=None) + RESPONSES[1] + "<|im_end|>\n"
    for flag in ({"activation": False}, {"use_activation": False, "add_special_tokens": False}):
        resp = httpx.post(f"{rm_url}/classify", json={"model": "/models/pal", "input": rm_prompt, **flag})
        assert resp.status_code == 200, resp.text
        score = resp.json()["data"][-1]["probs"][-1]
        assert close([score], [native(rm_url, [(PROMPT, RESPONSES[1], None)])[0]["reward"]])
    on = httpx.post(f"{rm_url}/classify", json={"input": rm_prompt, "use_activation": True}).json()
    assert 0.0 < on["data"][0]["probs"][0] < 1.0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "exactly one"),
        ({"input": "a", "messages": [{"role": "user", "content": "q"}]}, "exactly one"),
        ({"input": []}, "no inputs"),
        ({"messages": [{"role": "", "content": "q"}]}, "role"),
        ({"input": [None]}, "input"),
    ],
)
def test_classify_malformed_input_is_422(rm_url: str, body: dict, fragment: str) -> None:
    resp = httpx.post(f"{rm_url}/classify", json=body)
    assert resp.status_code == 422, resp.text
    assert fragment in resp.json()["detail"]


# --- /score/chat and the client -----------------------------------------------------------------------------------


def test_score_chat_forms_agree_with_score(rm_url: str) -> None:
    conv = [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": PROMPT}]
    items = [
        {"messages": [*conv, {"role": "assistant", "content": RESPONSES[0]}], "user_id": "user-1"},
        {"prompt": conv, "response": [{"role": "assistant", "content": RESPONSES[0]}], "user_id": "user-1"},
        {"prompt": chatml_prompt(PROMPT), "response": RESPONSES[0] + "<|im_end|>", "user_id": "user-1"},
        {"prompt": PROMPT, "response": {"role": "assistant", "content": RESPONSES[0]}, "user_id": "user-1"},
    ]
    with PalClient(rm_url) as client:
        batch = client.score_chat(items, with_prototypes=True)
        expected = client.score([(PROMPT, RESPONSES[0], "user-1")]).rewards[0]
    assert close(batch.rewards, [expected] * 4)
    assert all(r.personalized and len(r.prototype_rewards or []) == 3 for r in batch.results)


def test_score_chat_accepts_empty_response_and_rejects_ambiguous_items(rm_url: str) -> None:
    ok = httpx.post(f"{rm_url}/score/chat", json={"items": [{"prompt": PROMPT, "response": "</s>"}]})
    assert ok.status_code == 200, ok.text
    both = {"items": [{"messages": [{"role": "assistant", "content": "a"}], "prompt": "p"}]}
    resp = httpx.post(f"{rm_url}/score/chat", json=both)
    assert resp.status_code == 422 and "not both" in resp.json()["detail"]
    spaced_user = httpx.post(f"{rm_url}/score/chat", json={"items": [{"response": "a", "user_id": "x y"}]})
    assert spaced_user.status_code == 200 and spaced_user.json()["results"][0]["user_id"] == "x y"


# --- adapters -----------------------------------------------------------------------------------------------------


def test_trl_reward_func_standard_and_conversational(rm_url: str) -> None:
    reward_fn = make_trl_reward_func(rm_url, user_field="user_id")
    assert reward_fn.__name__ == "pal_reward"
    assert list(inspect.signature(reward_fn).parameters) == ["prompts", "completions", "kwargs"]
    users = ["user-0", "user-3", None]
    expected = [e["reward"] for e in native(rm_url, [(PROMPT, r, u) for r, u in zip(RESPONSES, users, strict=True)])]
    standard = reward_fn(prompts=[PROMPT] * 3, completions=RESPONSES, user_id=users, completion_ids=[[1]] * 3)
    conversational = reward_fn(
        prompts=[[{"role": "user", "content": PROMPT}]] * 3,
        completions=[[{"role": "assistant", "content": r}] for r in RESPONSES],
        user_id=users,
        trainer_state=None,
    )
    assert close(standard, expected) and close(conversational, expected)


def test_trl_reward_func_requires_the_user_column_unless_told(rm_url: str) -> None:
    with pytest.raises(KeyError, match="user_id"):
        make_trl_reward_func(rm_url)(prompts=[PROMPT], completions=["x"])
    population = make_trl_reward_func(rm_url, missing_user="population")(prompts=[PROMPT], completions=["x"])
    assert close(population, [native(rm_url, [(PROMPT, "x", None)])[0]["reward"]])


def test_verl_compute_score_reads_user_and_prompt_from_extra_info(rm_url: str) -> None:
    compute_score, compute_score_batch = make_compute_score(rm_url)
    expected = [e["reward"] for e in native(rm_url, [(PROMPT, r, "user-2") for r in RESPONSES])]
    single = [compute_score("pal", r + "<|im_end|>", None, {"user_id": "user-2", "prompt": PROMPT}) for r in RESPONSES]
    infos = [{"user_id": "user-2", "prompt": [{"role": "user", "content": PROMPT}]}] * 3
    batch = compute_score_batch(["pal"] * 3, RESPONSES, [None] * 3, infos)
    assert close(single, expected) and close(batch, expected)
    no_user = compute_score("pal", RESPONSES[0], None, {"question": PROMPT})
    assert close([no_user], [native(rm_url, [(PROMPT, RESPONSES[0], None)])[0]["reward"]])


def test_verl_module_function_uses_pal_rm_url(rm_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAL_RM_URL", rm_url)
    compute_score, _ = make_compute_score()  # the same construction as the module-level compute_score
    assert isinstance(compute_score("d", "Blue.", None, {"prompt": PROMPT, "user_id": "user-0"}), float)


def test_users_rank_the_same_candidates_differently_through_every_protocol(rm_url: str) -> None:
    candidates = [
        "Blue.",
        "Blue, because it is calm and reminds me of the sea on a quiet morning.",
        "Red!!! Definitely red, the boldest color there is.",
        "I would say green, though honestly any color is fine.",
        "Colors are wavelengths of light; one example is 550 nm, which we perceive as green.",
    ]
    reward_fn = make_trl_reward_func(rm_url)
    prompt = chatml_prompt(PROMPT)
    rankings = {}
    for user in SEEN_USERS:
        via_trl = reward_fn(prompts=[PROMPT] * 5, completions=candidates, user_id=[user] * 5)
        via_openrlhf = httpx.post(
            f"{rm_url}/get_reward",
            json={"query": [prompt + c for c in candidates], "prompts": [prompt] * 5, "labels": [user] * 5},
        ).json()["rewards"]
        assert close(via_trl, via_openrlhf)
        rankings[user] = tuple(sorted(range(5), key=lambda i: -via_trl[i]))
    assert len(set(rankings.values())) > 1, rankings


# --- auth and the checkpoint's chat template ----------------------------------------------------------------------


def test_protocol_routes_require_the_api_key(bundle_b: Path, scorer_b, tmp_path: Path) -> None:
    from tests.support import cpu_settings, serve_app

    settings = cpu_settings(bundle_b, tmp_path / "redis", api_key="s3cret")
    server = serve_app(settings, scorer_b)
    url = next(server)
    try:
        for path, body in [
            ("/get_reward", {"query": ["a"]}),
            ("/classify", {"input": "a"}),
            ("/score/chat", {"items": [{"response": "a"}]}),
        ]:
            assert httpx.post(f"{url}{path}", json=body).status_code == 401
            ok = httpx.post(f"{url}{path}", json=body, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
        reward_fn = make_trl_reward_func(url, api_key="s3cret", missing_user="population")
        assert len(reward_fn(prompts=["p"], completions=["r"])) == 1
    finally:
        server.close()


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_bundle_chat_template_is_used_by_every_protocol(bundle_b: Path, tmp_path: Path) -> None:
    from models.bundle import CONFIG_FILE, read_meta, seal
    from models.scorer import Scorer
    from tests.support import cpu_settings, serve_app

    templated = tmp_path / "bundle"
    templated.mkdir()
    for entry in bundle_b.iterdir():
        if entry.name != CONFIG_FILE:
            (templated / entry.name).symlink_to(entry)
    meta = read_meta(bundle_b).model_copy(update={"chat_template": CHATML_TEMPLATE})
    (templated / CONFIG_FILE).write_text(meta.model_dump_json())
    seal(templated)  # a template changes rewards: the edited bundle is another model version
    scorer = Scorer.load(templated, provider="cpu", intra_op_threads=1, cache_size=256)
    settings = cpu_settings(templated, tmp_path / "redis")
    server = serve_app(settings, scorer)
    url = next(server)
    try:
        rendered_prompt = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        expected = native(url, [(rendered_prompt, RESPONSES[0], "user-1")])[0]["reward"]
        plain_prompt = native(url, [(PROMPT, RESPONSES[0], "user-1")])[0]["reward"]
        assert not math.isclose(expected, plain_prompt)  # the template really changes what is scored
        conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSES[0]}]
        via_chat = httpx.post(f"{url}/score/chat", json={"items": [{"messages": conv, "user_id": "user-1"}]})
        # A Llama-3-templated OpenRLHF query is re-rendered with the bundle's ChatML template.
        llama_prompt = f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>"
        llama_prompt += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        via_openrlhf = httpx.post(
            f"{url}/get_reward",
            json={
                "query": [llama_prompt + RESPONSES[0] + "<|eot_id|>"],
                "prompts": [llama_prompt],
                "labels": ["user-1"],
            },
        )
        assert close([via_chat.json()["results"][0]["reward"], via_openrlhf.json()["rewards"][0]], [expected] * 2)
    finally:
        server.close()
