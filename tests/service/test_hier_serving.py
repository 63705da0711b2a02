"""Serving the hierarchical model (issue 21): the global K=1 reward plus a low-rank personal deviation, exported
from a checkpoint `pal eval` writes (training.hierarchical.write_hier_checkpoint), served with /score and /adapt
unchanged for clients. A user with no comparisons gets the K=1 model's rewards exactly; /adapt fits with the
fitter `pal eval` measures (models.deviation.fit_deviation); objectives behave as documented, refusals are 4xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import bundle as B
from models.bundle import BundleError
from models.checkpoint import CheckpointError, read_checkpoint
from models.deviation import DEVIATION_FILE, fit_deviation, posterior_confidence
from models.head import margins
from models.scorer import Scorer
from tests.scorer.factory import copy_bundle, make_hier_bundles
from tests.support import cpu_settings, running_app

PROMPT = "Which plan for the weekend?"
RESPONSES = [
    "A long hike in the hills, then a slow dinner.",
    "Stay in and watch films all day.",
    "Visit the new museum downtown.",
    "Sleep late and read a book.",
    "Volunteer at the community garden.",
    "Go to a loud concert with friends.",
    "Cook a big meal for the family.",
    "Work on a side project.",
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_hier_bundles(tmp_path_factory.mktemp("hier"), rank=2)


@pytest.fixture(scope="module")
def k1_scorer(bundles) -> Scorer:
    return Scorer.load(bundles[0], provider="cpu", intra_op_threads=1, cache_size=4096)


@pytest.fixture(scope="module")
def hier_scorer(bundles) -> Scorer:
    return Scorer.load(bundles[1], provider="cpu", intra_op_threads=1, cache_size=4096)


def test_bundle_carries_the_deviation_and_its_graph_outputs_v_e(bundles, hier_scorer) -> None:
    """The graph's `deviation` output is V e(x) of the torch encoder (the pooled embedding times the basis)."""
    import torch

    from models.encoder import PooledEncoder, load_tokenizer

    meta = hier_scorer.meta
    assert meta.deviation_rank == 2 and meta.output_names == [B.LATENT, B.PROMPT_PROTOTYPES, B.DEVIATION]
    assert DEVIATION_FILE in meta.digests
    ckpt = read_checkpoint(bundles[1].parent / "checkpoint-hier")
    assert meta.checkpoint_version == ckpt.meta.version and ckpt.deviation is not None
    np.testing.assert_array_equal(hier_scorer.deviation.basis, ckpt.deviation.basis)
    spec = meta.encoder
    tokenizer = load_tokenizer(spec)
    tokenizer.truncation_side = spec.truncation_side
    t = tokenizer(RESPONSES, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        e = PooledEncoder(spec).eval()(t["input_ids"], t["attention_mask"]).numpy().astype(np.float64)
    expected = e @ ckpt.deviation.basis.T
    got = hier_scorer.encode([PROMPT] * len(RESPONSES), RESPONSES).deviation
    assert got.shape == (len(RESPONSES), 2)
    np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))
    assert max(meta.export_max_abs_diff.values()) < 1e-3


def test_zero_comparisons_is_the_k1_model_exactly(k1_scorer, hier_scorer) -> None:
    enc1 = k1_scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
    ench = hier_scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
    assert k1_scorer.meta.version != hier_scorer.meta.version
    np.testing.assert_array_equal(hier_scorer.prior, np.zeros(2))
    np.testing.assert_array_equal(hier_scorer.rewards(ench, hier_scorer.prior), k1_scorer.rewards(enc1, [1.0]))
    # A user's weights move the reward by w . V e(x), nothing else.
    w = np.array([0.7, -1.3])
    np.testing.assert_allclose(
        hier_scorer.rewards(ench, w), k1_scorer.rewards(enc1, [1.0]) + ench.deviation @ w, rtol=0, atol=1e-12
    )


@pytest.mark.anyio
async def test_score_without_comparisons_equals_the_k1_bundle(tmp_path, bundles, k1_scorer, hier_scorer) -> None:
    items = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    items += [{"prompt": PROMPT, "response": r, "user_id": "newcomer"} for r in RESPONSES]
    got = {}
    for name, scorer, bundle in (("k1", k1_scorer, bundles[0]), ("hier", hier_scorer, bundles[1])):
        settings = cpu_settings(bundle, tmp_path / f"redis-{name}")
        async with running_app(settings, scorer=scorer) as c:
            r = await c.post("/score", json={"items": items})
            assert r.status_code == 200, r.text
            got[name] = [x["reward"] for x in r.json()["results"]]
    assert got["hier"] == got["k1"]


def _following_comparisons(scorer: Scorer, target: np.ndarray) -> tuple[list[dict], float]:
    """Comparisons labelled by the hier reward at weights `target` where the global model ranks the pair the other
    way (so fitting must move the user off the global model), and the global model's accuracy on them."""
    enc = scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
    g, r = scorer.global_rewards(enc), scorer.rewards(enc, target)
    cmps, agree = [], []
    for i in range(len(RESPONSES)):
        for j in range(i + 1, len(RESPONSES)):
            win, lose = (i, j) if r[i] > r[j] else (j, i)
            cmps.append({"prompt": PROMPT, "chosen": RESPONSES[win], "rejected": RESPONSES[lose]})
            agree.append(g[win] > g[lose])
    return cmps, float(np.mean(agree))


@pytest.mark.anyio
async def test_adapt_follows_the_deviation_with_the_eval_fitter(tmp_path, bundles, hier_scorer) -> None:
    target = np.array([4.0, -3.0])
    cmps, global_acc = _following_comparisons(hier_scorer, target)
    assert global_acc < 0.8  # the comparisons disagree with the global model often enough to matter
    settings = cpu_settings(bundles[1], tmp_path / "redis")
    async with running_app(settings, scorer=hier_scorer) as c:
        r = await c.post("/users/ada/adapt", json={"comparisons": cmps})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["weights"]) == 2 and body["n_fitted"] == len(cmps)
        assert body["accuracy"] > global_acc + 0.1
        assert 0.0 < body["confidence"] <= 1.0
        # The one fitting path: exactly fit_deviation on the same features, the prior the bundle carries.
        feats = hier_scorer.features(*([x[k] for x in cmps] for k in ("prompt", "chosen", "rejected")))
        g = margins(hier_scorer.head, feats, np.ones(1))
        dev = hier_scorer.deviation
        expected = fit_deviation(g, feats.deviation, dev.prior_mean, dev.precision)
        np.testing.assert_allclose(body["weights"], expected, rtol=1e-9, atol=1e-12)
        assert body["confidence"] == pytest.approx(posterior_confidence(g, feats.deviation, expected, dev.precision))
        info = (await c.get("/info")).json()
        assert (info["form"], info["k"], info["deviation_rank"]) == ("B", 1, 2)
        state = (await c.get("/users/ada")).json()
        assert state["weights"] == body["weights"]
        # /score serves those weights: the same rewards as the scorer's, and ranks the user's pairs better.
        items = [{"prompt": PROMPT, "response": x, "user_id": "ada"} for x in RESPONSES]
        scored = np.array([x["reward"] for x in (await c.post("/score", json={"items": items})).json()["results"]])
        enc = hier_scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
        np.testing.assert_allclose(scored, hier_scorer.rewards(enc, np.array(body["weights"])), rtol=1e-12)
        # A seen user of the checkpoint is served their trained deviation weights.
        seen = (await c.get("/users/user-1")).json()
        np.testing.assert_allclose(seen["weights"], hier_scorer.seen_users()["user-1"], rtol=1e-6)


@pytest.mark.anyio
async def test_objectives_on_a_hierarchical_model(tmp_path, bundles, hier_scorer) -> None:
    settings = cpu_settings(bundles[1], tmp_path / "redis", population_ttl_s=0.0)
    enc = hier_scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
    items = [{"prompt": PROMPT, "response": x} for x in RESPONSES]
    async with running_app(settings, scorer=hier_scorer) as c:
        cmps, _ = _following_comparisons(hier_scorer, np.array([4.0, -3.0]))
        assert (await c.post("/users/ada/adapt", json={"comparisons": cmps})).status_code == 200
        # A mixture of prototypes means nothing here: a clear 422, not a 500.
        r = await c.post("/score", json={"items": items, "objective": {"kind": "weights", "weights": [1.0]}})
        assert r.status_code == 422 and "no prototypes" in r.text
        # mean over every stored user (the checkpoint's seen users and ada): the mean of their rewards.
        everyone = [*hier_scorer.seen_users(), "ada"]
        weights = np.array([(await c.get(f"/users/{u}")).json()["weights"] for u in everyone])
        r = await c.post("/score", json={"items": items, "objective": {"kind": "mean"}})
        assert r.status_code == 200, r.text
        expected = np.mean([hier_scorer.rewards(enc, w) for w in weights], axis=0)
        np.testing.assert_allclose([x["reward"] for x in r.json()["results"]], expected, rtol=1e-9, atol=1e-9)
        # mean over listed users, one of them unknown: counted at the prior (the global reward).
        r = await c.post("/score", json={"items": items, "objective": {"kind": "mean", "users": ["ada", "nobody"]}})
        expected = (hier_scorer.rewards(enc, weights[-1]) + hier_scorer.global_rewards(enc)) / 2
        np.testing.assert_allclose([x["reward"] for x in r.json()["results"]], expected, rtol=1e-9, atol=1e-9)
        # maxmin over named groups: the worse group's mean reward per item.
        groups = {"seen": list(hier_scorer.seen_users()), "ada": ["ada"]}
        r = await c.post("/score", json={"items": items, "objective": {"kind": "maxmin", "groups": groups}})
        assert r.status_code == 200, r.text
        seen_mean = np.mean([hier_scorer.rewards(enc, w) for w in weights[:-1]], axis=0)
        means = np.stack([seen_mean, hier_scorer.rewards(enc, weights[-1])], axis=1)
        np.testing.assert_allclose([x["reward"] for x in r.json()["results"]], means.min(1), rtol=1e-9, atol=1e-9)
        # maxmin over k-means clusters of the R-dim weights, and the population view in R dims.
        r = await c.post("/score", json={"items": items, "objective": {"kind": "maxmin"}})
        assert r.status_code == 200, r.text
        pop = (await c.get("/population", params={"sample": 10})).json()
        assert pop["k"] == 2 and pop["users"] == len(everyone) and all(len(w) == 2 for w in pop["weights"])
        # /score/chat refuses it as /score does; an RLHF label carrying it scores the population, flagged.
        chat = {
            "items": [{"prompt": PROMPT, "response": RESPONSES[0], "objective": {"kind": "weights", "weights": [1]}}]
        }
        r = await c.post("/score/chat", json=chat)
        assert r.status_code == 422 and "no prototypes" in r.text
        labels = [{"kind": "weights", "weights": [1.0]}, {"kind": "mean"}]
        body = {"query": [f"{PROMPT} {x}" for x in RESPONSES[:2]], "prompts": [PROMPT] * 2, "labels": labels}
        r = await c.post("/get_reward", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["extra_logs"]["flagged"] == [1.0, 0.0]
        # The prototype vector has one entry, the global reward: linear with lambda = [1] is g.
        r = await c.post("/score", json={"items": items, "objective": {"kind": "linear", "weights": [1.0]}})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["reward"] for x in r.json()["results"]], hier_scorer.global_rewards(enc))


def test_pal_bundle_is_unchanged(bundle_b, scorer_b) -> None:
    """A bundle without a deviation (every bundle exported before) loads as PAL, under the version it had."""
    meta = B.read_meta(bundle_b)
    assert meta.deviation_rank is None and scorer_b.deviation is None and scorer_b.weights_dim == 3
    assert B.DEVIATION not in meta.output_names and DEVIATION_FILE not in meta.digests
    # The version hashes exactly the fields it hashed before a deviation existed.
    import hashlib

    fields = meta.model_dump(mode="json", include=set(B.VERSIONED_FIELDS))
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name, digest in sorted(meta.digests.items()):
        h.update(f"\n{name}={digest}".encode())
    assert meta.version == "pal-" + h.hexdigest()[:16]
    enc = scorer_b.encode(["p"], ["r"])
    assert enc.deviation is None
    np.testing.assert_array_equal(np.asarray(scorer_b.prior), np.asarray(meta.prior_weights))


def _with_basis(src: Path, dest: Path, basis: np.ndarray) -> Path:
    arrays = load_file(str(src / DEVIATION_FILE))
    arrays["basis"] = basis.astype(np.float32)
    (dest / DEVIATION_FILE).unlink(missing_ok=True)
    save_file(arrays, str(dest / DEVIATION_FILE))
    return dest


def test_wrong_shape_basis_is_refused(bundles, tmp_path) -> None:
    hier = bundles[1]
    bad = copy_bundle(hier, tmp_path / "bad")
    _with_basis(hier, bad, np.zeros((2, 100)))
    B.seal(bad)  # well-formed and sealed: the shape check, not the digest, must refuse it
    with pytest.raises(BundleError, match=r"basis has shape \(2, 100\), expected \(2, 384\)"):
        Scorer.load(bad, provider="cpu", intra_op_threads=1)
    # The rank the config declares must match the file's (and the graph's outputs).
    rank3 = copy_bundle(hier, tmp_path / "rank3")
    meta = B.read_meta(rank3)
    B.seal(rank3, meta.model_copy(update={"deviation_rank": 3}))
    with pytest.raises(BundleError, match=r"basis has shape \(2, 384\), expected \(3, 384\)"):
        Scorer.load(rank3, provider="cpu", intra_op_threads=1)
    # The checkpoint refuses it too.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hier.parent / "checkpoint-hier", ckpt)
    _with_basis(ckpt, ckpt, np.zeros((2, 7)))
    with pytest.raises(CheckpointError, match=r"basis has shape \(2, 7\)"):
        read_checkpoint(ckpt)
    missing = copy_bundle(hier, tmp_path / "missing")
    (missing / DEVIATION_FILE).unlink()
    with pytest.raises(BundleError, match="has no deviation.safetensors"):
        Scorer.load(missing, provider="cpu", intra_op_threads=1)


def _with_items(src: Path, dest: Path, items: dict[str, np.ndarray]) -> Path:
    """The bundle at dest with src's deviation plus a per-statement table (statement_key -> c_x), resealed."""
    from models.deviation import Deviation

    arrays = load_file(str(src / DEVIATION_FILE))
    dev = Deviation.with_items(*(arrays[n] for n in ("basis", "prior_mean", "precision", "user_weights")), items)
    (dest / DEVIATION_FILE).unlink(missing_ok=True)
    dev.save(dest)
    B.seal(dest)
    return dest


@pytest.mark.anyio
async def test_known_statements_add_their_own_vectors(bundles, hier_scorer, tmp_path) -> None:
    """A per-statement table (training knew the statement: b(p, x) = V e(x) + c_x) is served: known statements
    get their vector, any other text none; /adapt fits on the same b, so a user who follows the table is learned."""
    from models.deviation import statement_key

    rng = np.random.default_rng(3)
    known = RESPONSES[:6]
    items = {statement_key(PROMPT, x): 3.0 * rng.normal(size=2) for x in known}
    table = Scorer.load(_with_items(bundles[1], copy_bundle(bundles[1], tmp_path / "items"), items), provider="cpu",
                        intra_op_threads=1)  # fmt: skip
    plain, withc = hier_scorer.encode([PROMPT] * 8, RESPONSES), table.encode([PROMPT] * 8, RESPONSES)
    offsets = np.stack([items.get(statement_key(PROMPT, x), np.zeros(2)) for x in RESPONSES])
    np.testing.assert_allclose(withc.deviation, plain.deviation + offsets, rtol=1e-6, atol=1e-6)
    assert (offsets[6:] == 0).all()
    # The key is the statement under its prompt: the same text under another prompt is not the known statement.
    other = table.encode(["Another question?"], [RESPONSES[0]])
    np.testing.assert_allclose(other.deviation, hier_scorer.encode(["Another question?"], [RESPONSES[0]]).deviation)
    # Zero shots are still the global model; /adapt learns a user from the table's directions.
    np.testing.assert_array_equal(table.rewards(withc, table.prior), hier_scorer.rewards(plain, hier_scorer.prior))
    target = np.array([2.0, -2.0])
    cmps, global_acc = _following_comparisons(table, target)
    async with running_app(cpu_settings(bundles[1], tmp_path / "redis"), scorer=table) as c:
        body = (await c.post("/users/bo/adapt", json={"comparisons": cmps})).json()
        assert body["accuracy"] > global_acc + 0.1
        feats = table.features(*([x[k] for x in cmps] for k in ("prompt", "chosen", "rejected")))
        g = margins(table.head, feats, np.ones(1))
        expected = fit_deviation(g, feats.deviation, table.deviation.prior_mean, table.deviation.precision)
        np.testing.assert_allclose(body["weights"], expected, rtol=1e-9, atol=1e-12)
        scored = (await c.post("/score", json={"items": [{"prompt": PROMPT, "response": x, "user_id": "bo"}
                                                           for x in RESPONSES]})).json()  # fmt: skip
        np.testing.assert_allclose([x["reward"] for x in scored["results"]], table.rewards(withc, expected), rtol=1e-9)


def test_item_table_is_checked(bundles, tmp_path) -> None:
    hier = bundles[1]
    bad = copy_bundle(hier, tmp_path / "bad")
    arrays = load_file(str(hier / DEVIATION_FILE))
    arrays["item_keys"] = np.zeros((2, 8), dtype=np.uint8)  # two rows, one key
    arrays["item_vectors"] = np.zeros((2, 2), dtype=np.float32)
    (bad / DEVIATION_FILE).unlink()
    save_file(arrays, str(bad / DEVIATION_FILE))
    B.seal(bad)
    with pytest.raises(BundleError, match="item_keys must be distinct"):
        Scorer.load(bad, provider="cpu", intra_op_threads=1)
    arrays["item_vectors"] = np.zeros((2, 3), dtype=np.float32)
    (bad / DEVIATION_FILE).unlink()
    save_file(arrays, str(bad / DEVIATION_FILE))
    B.seal(bad)
    with pytest.raises(BundleError, match=r"item_vectors has shape \(2, 3\), expected \(2, 2\)"):
        Scorer.load(bad, provider="cpu", intra_op_threads=1)
