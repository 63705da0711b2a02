"""The hierarchical reward (global + low-rank deviation): zero shots are the global model exactly, the empirical
Bayes prior is finite, the one fitter finds the MAP and moves further from the prior with more comparisons, and
on data with two opposed groups the deviation beats the global model (LoRe, its baseline, runs too)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from models.config import PALConfig
from models.deviation import empirical_bayes_precision, fit_deviation, statement_key
from models.head import HeadParams
from tests.core.polis_fixture import statements, write_conversation
from training.data.polis import PolisParams, build_polis
from training.data.schema import Comparison
from training.encoded import EncodedComparisons
from training.fewshot import zero_shot_accuracy
from training.hierarchical import (
    KNOWN_STATEMENT_GRID,
    DeviationConfig,
    Pairs,
    choose_deviation,
    grid_key,
    known_statement_grid,
    known_statements,
    measure_deviation,
    restart_grid,
    statement_keys,
    train_deviation,
)
from training.train import accuracy_of_margins

D = 8


def global_head(direction: np.ndarray) -> HeadParams:
    """A K=1 PAL-B head: f = identity, the prompt prototype a fixed direction (g = bias only), tau 5."""
    cfg = PALConfig(form="B", k=1, prompt_dim=1, item_dim=D, latent_dim=D, n_hidden=0)
    arrays = {
        "f.w0": np.eye(D),
        "f.b0": np.zeros(D),
        "g.w0": np.zeros((1, 1, D)),
        "g.b0": direction[None],
        "log_tau": np.array(np.log(5.0)),
        "tau": np.array([5.0]),
    }
    return HeadParams(cfg, arrays)


def two_groups(seed: int = 0) -> tuple[HeadParams, dict[str, EncodedComparisons]]:
    """Users of two groups that share the global taste and disagree along one other direction of the item
    embedding; labels follow each user's true reward. Every split gets its own pairs of 200 items."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(200, D))
    shared, split_dir = np.eye(D)[0], np.eye(D)[1]

    def reward(x: np.ndarray, sign: int) -> np.ndarray:
        return 0.5 * x @ shared + 1.5 * sign * (x @ split_dir)

    def split(users: list[str], n: int) -> EncodedComparisons:
        names, c_idx, r_idx = [], [], []
        for u in users:
            sign = 1 if u.startswith("a") else -1
            for _ in range(n):
                i, j = rng.choice(len(items), 2, replace=False)
                win = reward(items[i], sign) > reward(items[j], sign)
                names.append(u)
                c_idx.append(i if win else j)
                r_idx.append(j if win else i)
        n_rows = len(names)
        return EncodedComparisons(
            names, np.ones((1, 1)), items, np.zeros(n_rows, np.int64), np.asarray(c_idx), np.asarray(r_idx)
        )

    seen = [f"{g}{i}" for g in "ab" for i in range(10)]
    unseen = [f"{g}u{i}" for g in "ab" for i in range(5)]
    encs = {
        "seen_train": split(seen, 40),
        "seen_val": split(seen, 15),
        "seen_test": split(seen, 15),
        "unseen_pool": split(unseen, 20),
        "unseen_test": split(unseen, 20),
    }
    return global_head(shared), encs


def test_zero_shot_hierarchical_user_is_the_global_model_exactly() -> None:
    head, encs = two_groups()
    out = measure_deviation(head, encs, use_global=True, shots=(0, 5, 20))[0]
    assert out["unseen_zero_shot_accuracy"] == zero_shot_accuracy(head, np.ones(1), encs["unseen_test"])
    assert out["unseen_fewshot"]["0"]["accuracy"] == out["unseen_zero_shot_accuracy"]  # no pairs: the prior
    # and margin by margin: a user at the prior mean (w = 0) gets g(chosen) - g(rejected), bit for bit
    p = {s: Pairs.build(head, e, True) for s, e in encs.items()}
    model = train_deviation(p["seen_train"], p["seen_val"], use_global=True)
    rows = np.arange(len(p["unseen_test"].users))
    assert np.array_equal(model.prior_mean, np.zeros(2))
    assert np.array_equal(model.user_margins(p["unseen_test"], rows, model.prior_mean), p["unseen_test"].global_margin)


def test_deviation_beats_the_global_model_where_groups_disagree() -> None:
    head, encs = two_groups()
    hier = measure_deviation(head, encs, use_global=True, shots=(5, 20))[0]
    base = zero_shot_accuracy(head, np.ones(1), encs["seen_test"])
    assert hier["best_epoch"] > 0  # validation kept a deviation (epoch 0 is the global model)
    assert hier["seen_test_accuracy"] > base + 0.1
    assert hier["unseen_fewshot"]["20"]["accuracy"] > hier["unseen_zero_shot_accuracy"] + 0.1
    lore = measure_deviation(head, encs, use_global=False, shots=(20,))[0]
    assert lore["form"] == "lore" and lore["unseen_fewshot"]["20"]["accuracy"] > 0.6


def test_empirical_bayes_precision_is_finite() -> None:
    assert np.all(np.isfinite(empirical_bayes_precision(np.zeros((5, 3)), np.zeros(3))))
    prec = empirical_bayes_precision(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.zeros(2))
    assert prec[0] == pytest.approx(1.0, rel=1e-5) and np.isfinite(prec[1]) and prec[1] > 1e5


def test_fit_is_the_map_and_moves_with_the_number_of_comparisons() -> None:
    rng = np.random.default_rng(3)
    true_w, k = np.array([1.5, -1.0]), 2
    basis = rng.normal(size=(400, k))
    g = rng.normal(size=400)
    y = rng.random(400) < 1 / (1 + np.exp(-(g + basis @ true_w)))
    sign = np.where(y, 1.0, -1.0)  # a pair the user rejected is the same pair with its sides swapped
    gm, bm = sign * g, sign[:, None] * basis
    mean, prec = np.zeros(k), np.full(k, 2.0)
    assert np.array_equal(fit_deviation(gm[:0], bm[:0], mean, prec), mean)

    def posterior(w: np.ndarray, n: int) -> float:
        return float(np.logaddexp(0, -(gm[:n] + bm[:n] @ w)).sum() + 0.5 * (prec * w * w).sum())

    w50 = fit_deviation(gm[:50], bm[:50], mean, prec)
    ref = minimize(posterior, np.zeros(k), args=(50,), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w50, ref, atol=1e-5)
    errors = [np.linalg.norm(fit_deviation(gm[:n], bm[:n], mean, prec) - true_w) for n in (2, 20, 400)]
    assert errors[0] > errors[1] > errors[2]
    norms = [np.linalg.norm(fit_deviation(gm[:n], bm[:n], mean, prec)) for n in (2, 20, 400)]
    assert norms[0] < norms[2]  # little data stays near the prior (zero: the global model)


def test_stronger_l2_keeps_the_deviation_smaller() -> None:
    head, encs = two_groups(1)
    p = {s: Pairs.build(head, e, True) for s, e in encs.items()}
    weak = train_deviation(p["seen_train"], p["seen_val"], True, DeviationConfig(l2=1.0))
    strong = train_deviation(p["seen_train"], p["seen_val"], True, DeviationConfig(l2=1000.0))
    assert np.all(np.isfinite(strong.precision)) and strong.precision.min() > weak.precision.min()


def test_user_level_cross_validation_keeps_a_deviation_only_where_it_carries_to_held_out_users() -> None:
    head, encs = two_groups()
    cv = DeviationConfig(cv_folds=3)
    kept = measure_deviation(head, encs, use_global=True, shots=(20,), cfg=cv)[0]
    assert kept["cv_gain"] > 0.05  # two real groups: held-out users gain from the deviation
    assert kept["unseen_fewshot"]["20"]["accuracy"] > kept["unseen_zero_shot_accuracy"] + 0.1
    # labels that are coin flips: whatever validation kept does not help held-out users, so the model is the
    # global one for everybody, at every number of shots
    rng = np.random.default_rng(5)
    noise = {}
    for name, e in encs.items():
        flip = rng.random(len(e)) < 0.5
        c, r = np.where(flip, e.rejected_idx, e.chosen_idx), np.where(flip, e.chosen_idx, e.rejected_idx)
        noise[name] = EncodedComparisons(e.users, e.prompt_vecs, e.item_vecs, e.prompt_idx, c, r)
    out = measure_deviation(head, noise, use_global=True, shots=(5, 20), cfg=cv)[0]
    assert out["best_epoch"] == 0 or out["cv_gain"] <= 0
    assert out["unseen_fewshot"]["20"]["accuracy"] == out["unseen_zero_shot_accuracy"]
    global_seen = accuracy_of_margins(Pairs.build(head, noise["seen_test"], True).global_margin)
    assert out["seen_test_accuracy"] == global_seen


def statement_groups(seed: int = 0) -> tuple[HeadParams, dict[str, EncodedComparisons], dict]:
    """Two groups of users that disagree on each statement by a planted sign that is independent of the
    statement's embedding (random): how people like you voted on *this* statement. All splits share the 60
    statements, as in the Polis pair hold-out; keys are the statements' ids."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(60, D))
    side = rng.choice([-1.0, 1.0], size=60)  # the planted per-statement split, not a function of the embedding
    shared = np.eye(D)[0]

    def split(users: list[str], n: int) -> tuple[EncodedComparisons, tuple[np.ndarray, np.ndarray]]:
        names, c_idx, r_idx = [], [], []
        for u in users:
            sign = 1.0 if u.startswith("a") else -1.0
            reward = 0.3 * items @ shared + 2.0 * sign * side
            for _ in range(n):
                i, j = rng.choice(len(items), 2, replace=False)
                win = reward[i] > reward[j]
                names.append(u)
                c_idx.append(i if win else j)
                r_idx.append(j if win else i)
        c, r = np.asarray(c_idx), np.asarray(r_idx)
        enc = EncodedComparisons(names, np.ones((1, 1)), items, np.zeros(len(names), np.int64), c, r)
        return enc, (c.astype(str), r.astype(str))

    seen = [f"{g}{i}" for g in "ab" for i in range(15)]
    unseen = [f"{g}u{i}" for g in "ab" for i in range(6)]
    sizes = {"seen_train": (seen, 40), "seen_val": (seen, 15), "seen_test": (seen, 15)}
    sizes |= {"unseen_pool": (unseen, 20), "unseen_test": (unseen, 20)}
    built = {name: split(*args) for name, args in sizes.items()}
    return global_head(shared), {k: v[0] for k, v in built.items()}, {k: v[1] for k, v in built.items()}


def test_per_statement_vectors_learn_a_statement_preference_the_embedding_basis_cannot() -> None:
    head, encs, keys = statement_groups()
    embed_only = measure_deviation(head, encs, True, shots=(0, 20), cfg=DeviationConfig(rank=1), keys=keys)[0]
    items = measure_deviation(head, encs, True, shots=(0, 20), cfg=DeviationConfig(rank=1, item_l2=1.0), keys=keys)[0]
    assert embed_only["item_vectors"] == 0 and items["item_vectors"] == 60
    assert items["seen_test_accuracy"] > embed_only["seen_test_accuracy"] + 0.1
    assert items["unseen_fewshot"]["20"]["accuracy"] > embed_only["unseen_fewshot"]["20"]["accuracy"] + 0.1
    # zero shots are still the global model exactly, margin by margin
    assert items["unseen_zero_shot_accuracy"] == zero_shot_accuracy(head, np.ones(1), encs["unseen_test"])
    assert items["unseen_fewshot"]["0"]["accuracy"] == items["unseen_zero_shot_accuracy"]
    p = {s: Pairs.build(head, e, True, keys[s]) for s, e in encs.items()}
    model = train_deviation(p["seen_train"], p["seen_val"], True, DeviationConfig(rank=1, item_l2=1.0))
    rows = np.arange(len(p["unseen_test"].users))
    assert np.array_equal(model.user_margins(p["unseen_test"], rows, model.prior_mean), p["unseen_test"].global_margin)


def test_a_statement_outside_training_has_no_per_statement_vector() -> None:
    head, encs, keys = statement_groups(1)
    p = {s: Pairs.build(head, e, True, keys[s]) for s, e in encs.items()}
    model = train_deviation(p["seen_train"], p["seen_val"], True, DeviationConfig(rank=2, item_l2=1.0))
    test = p["unseen_test"]
    rows = np.arange(len(test.users))
    renamed = Pairs(test.global_margin, test.diff, test.users, np.char.add("new", test.chosen_key), test.rejected_key)
    with_c, embed_only = model.basis_margins(test, rows), test.diff @ model.basis.T
    assert not np.allclose(with_c, embed_only)
    got = model.basis_margins(renamed, rows)  # every chosen item unknown: only the rejected side's c_x is left
    want = embed_only - np.stack([model.item_vectors[k] for k in test.rejected_key])
    np.testing.assert_allclose(got, want)


def test_statement_keys_identify_a_statement_under_its_prompt_across_splits() -> None:
    a = [Comparison("u1", "topic", "yes", "no"), Comparison("u2", "topic", "no", "maybe")]
    b = [Comparison("u3", "topic", "maybe", "yes"), Comparison("u4", "other topic", "yes", "no")]
    (ca, ra), (cb, rb) = statement_keys(a), statement_keys(b)
    assert ca[0] == rb[0] == statement_key("topic", "yes") and ra[0] == ca[1] and ra[1] == cb[0]
    assert cb[1] != ca[0]  # the same text under another prompt is another statement
    assert known_statements((ca, ra), (cb[:1], rb[:1])) and not known_statements((ca, ra), (cb[1:], rb[1:]))


def test_the_grid_keeps_the_config_seen_validation_prefers() -> None:
    head, encs, keys = statement_groups(2)
    p = {s: Pairs.build(head, e, True, keys[s]) for s, e in encs.items()}
    grid = [DeviationConfig(rank=1), DeviationConfig(rank=1, item_l2=1.0)]
    model, cfg, scores = choose_deviation(p["seen_train"], p["seen_val"], True, grid)
    assert cfg.item_l2 == 1.0 and model.item_vectors and scores[grid_key(grid[1])] > scores[grid_key(grid[0])]


@pytest.mark.parametrize("holdout", ["pairs", "statements"])
def test_per_statement_vectors_are_used_only_where_training_knows_the_held_out_statements(
    tmp_path, monkeypatch, holdout: str
) -> None:
    write_conversation(tmp_path, "conv", n_participants=60, n_statements=60, votes_per_participant=40, seed=1)
    monkeypatch.setenv("PAL_DATA_DIR", str(tmp_path))
    splits = build_polis(PolisParams(conversation="conv", holdout=holdout))  # type: ignore[arg-type]
    keys = {s: statement_keys(getattr(splits, s)) for s in ("seen_train", "seen_val")}
    grid = known_statement_grid(DeviationConfig(seed=3), keys)
    if holdout == "pairs":  # Polis' pair hold-out: every validation statement is a training statement
        assert grid and all(c.item_l2 is not None and c.seed == 3 for c in grid)
    else:  # new statements in validation and test: hier as before, no per-statement vectors
        assert grid == []


def test_restarts_chosen_by_cross_validation_keep_the_best_and_fall_back_to_the_global_model() -> None:
    head, encs = two_groups()
    grid = restart_grid(DeviationConfig(seed=7), 3)
    assert [c.seed for c in grid] == [7, 1007, 2007]
    p = {s: Pairs.build(head, e, True) for s, e in encs.items()}
    _, cfg, scores = choose_deviation(p["seen_train"], p["seen_val"], True, grid, choose_on="cv")
    assert len(scores) == 3 and scores[grid_key(cfg)] == max(scores.values()) > 0.05
    out = measure_deviation(head, encs, True, shots=(20,), grid=grid, choose_on="cv")[0]
    assert out["cv_gain"] == max(scores.values())
    assert out["unseen_fewshot"]["20"]["accuracy"] > out["unseen_zero_shot_accuracy"] + 0.1
    rng = np.random.default_rng(5)  # coin-flip labels: no restart helps held-out users, so hier is the global model
    noise = {}
    for name, e in encs.items():
        flip = rng.random(len(e)) < 0.5
        c, r = np.where(flip, e.rejected_idx, e.chosen_idx), np.where(flip, e.chosen_idx, e.rejected_idx)
        noise[name] = EncodedComparisons(e.users, e.prompt_vecs, e.item_vecs, e.prompt_idx, c, r)
    out = measure_deviation(head, noise, True, shots=(5, 20), grid=grid, choose_on="cv")[0]
    assert out["best_epoch"] == 0 or out["cv_gain"] <= 0
    assert out["unseen_fewshot"]["20"]["accuracy"] == out["unseen_zero_shot_accuracy"]


def test_pal_eval_on_known_statements_reports_hier_with_per_statement_vectors(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    write_conversation(tmp_path / "data", "dense", n_participants=60, n_statements=60, votes_per_participant=40)
    monkeypatch.setenv("PAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    args = ["eval", "--preset", "polis-pairs", "--k", "2", "--seeds", "0", "--shots", "5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    models = json.loads((out / "seed0" / "report.json").read_text())["experiments"][0]["models"]
    hier = models["hier"]
    assert hier["item_l2"] is not None and hier["k"] == KNOWN_STATEMENT_GRID[0][0]
    assert hier["item_vectors"] > 0 and hier["best_epoch"] > 0  # two opposed groups: the deviation is kept
    assert hier["seen_test_accuracy"] > models["1"]["seen_test_accuracy"] + 0.1
    assert hier["unseen_zero_shot_accuracy"] == models["1"]["unseen_zero_shot_accuracy"]
    # What is served is that model, per-statement table included (the model measured, not one trained again).
    from models.checkpoint import read_checkpoint

    assert models["served"]["served_selection"]["served_form"] == "hier"
    served = read_checkpoint(models["served"]["checkpoint"])
    assert served.meta.deviation_rank == hier["k"] and served.deviation is not None
    assert served.deviation.item_vectors is not None
    assert served.deviation.item_vectors.shape == (hier["item_vectors"], hier["k"])
    np.testing.assert_allclose(1 / np.sqrt(served.deviation.precision), hier["prior_sigma"], rtol=1e-5)
    # The Polis presets' encoder (all-mpnet-base-v2) exports and serves that model: the graph's V e(x) matches the
    # torch encoder, a known statement gets its c_x, an unknown one none, and zero weights are the K=1 model.
    from models.export import export_bundle
    from models.scorer import Scorer
    from training.data.polis import topic

    assert served.meta.encoder.name_or_path == "all-mpnet-base-v2" and served.meta.pal.item_dim == 768
    export_bundle(models["served"]["checkpoint"], tmp_path / "bundle")
    scorer = Scorer.load(tmp_path / "bundle", provider="cpu", intra_op_threads=1)
    assert max(scorer.meta.export_max_abs_diff.values()) < 1e-3
    prompt, known = topic("dense"), statements(60)[0]
    items = [known, "A statement nobody in this conversation voted on."]
    enc = scorer.encode([prompt] * 2, items)
    w = np.linspace(-1.0, 1.0, hier["k"])
    offsets = served.deviation.item_offsets([prompt] * 2, items)
    assert np.abs(offsets[0]).max() > 0 and not offsets[1].any()
    # enc.deviation is V e(x) + c_x: the same statement under another prompt is not in the table, so only V e(x).
    alone = scorer.encode(["another topic"], [known]).deviation[0]
    np.testing.assert_allclose(enc.deviation[0], alone + offsets[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scorer.rewards(enc, w), scorer.global_rewards(enc) + enc.deviation @ w)
    np.testing.assert_array_equal(scorer.rewards(enc, np.zeros(hier["k"])), scorer.global_rewards(enc))
