"""Rewards from judge scores, rewriter RL rewards, and the cache of data-only judge scores."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sip.arguments import build_parser, config_from_namespace
from megatron_sip.errors import ConfigError
from megatron_sip.roles.rewards import context_is_safe, rewriter_reward, rewriter_rewards
from megatron_sip.training.sip.rewards import (
    RewardConfig,
    scores_from_columns,
    weighted_reward,
    weighted_rewards,
)
from megatron_sip.training.sip.score_store import ScoreStore, judge_identity

SCORES = {"quality": 0.8, "safety": 0.2, "factuality": 0.5}

# ---- the SIP reward ---------------------------------------------------------------------------


def test_quality_only_is_the_default():
    config = RewardConfig()
    assert config.objectives == ("quality",)
    assert config.weights() == {"quality": 1.0}
    assert config.reward(SCORES) == pytest.approx(0.8)


def test_safety_only():
    config = RewardConfig(sip_objectives="safety")
    assert config.weights() == {"safety": 1.0}
    assert config.reward(SCORES) == pytest.approx(0.2)
    # Only enabled objectives matter: a missing quality score does not hide the reward.
    assert config.reward({"safety": 0.9, "quality": None}) == pytest.approx(0.9)


def test_quality_and_safety_weighted():
    config = RewardConfig(sip_objectives="quality,safety", sip_objective_weights="0.7,0.3")
    assert config.weights() == pytest.approx({"quality": 0.7, "safety": 0.3})
    assert config.reward(SCORES) == pytest.approx(0.7 * 0.8 + 0.3 * 0.2)  # 0.62


def test_three_objectives_equal_weights():
    config = RewardConfig(sip_objectives="quality, safety ,factuality")  # spaces are fine
    assert config.weights() == pytest.approx({o: 1 / 3 for o in SCORES})
    assert config.reward(SCORES) == pytest.approx((0.8 + 0.2 + 0.5) / 3)  # 0.5


def test_order_of_weights_follows_order_of_objectives():
    config = RewardConfig(sip_objectives="safety,quality", sip_objective_weights="0.7,0.3")
    assert config.weights() == pytest.approx({"safety": 0.7, "quality": 0.3})
    assert config.reward(SCORES) == pytest.approx(0.7 * 0.2 + 0.3 * 0.8)


def test_weights_are_not_normalised():
    config = RewardConfig(sip_objectives="quality,safety", sip_objective_weights="2,0")
    assert config.reward(SCORES) == pytest.approx(1.6)


def test_missing_score_gives_no_reward():
    weights = RewardConfig(sip_objectives="quality,safety").weights()
    assert weighted_reward({"quality": 0.8, "safety": None}, weights) is None
    assert weighted_reward({"quality": 0.8}, weights) is None
    assert weighted_reward({"quality": float("nan"), "safety": 0.1}, weights) is None
    # Even with weight 0: the judge failed on this candidate, no value is made up.
    zero = RewardConfig(sip_objectives="quality,safety", sip_objective_weights="1,0").weights()
    assert weighted_reward({"quality": 0.8, "safety": None}, zero) is None


def test_batched_rewards_and_columns():
    weights = RewardConfig(
        sip_objectives="quality,safety", sip_objective_weights="0.5,0.5"
    ).weights()
    columns = {"quality": [1.0, 0.4, None], "safety": [0.0, 0.6, 1.0]}
    candidates = scores_from_columns(columns)
    assert candidates == [
        {"quality": 1.0, "safety": 0.0},
        {"quality": 0.4, "safety": 0.6},
        {"quality": None, "safety": 1.0},
    ]
    assert weighted_rewards(candidates, weights) == [
        pytest.approx(0.5),
        pytest.approx(0.5),
        None,
    ]
    with pytest.raises(ValueError):
        scores_from_columns({"quality": [1.0], "safety": [0.0, 1.0]})


@pytest.mark.parametrize(
    "objectives, weights, flag",
    [
        ("quality,coherence", None, "--sip-objectives"),
        ("", None, "--sip-objectives"),
        ("quality,", None, "--sip-objectives"),
        ("quality,quality", None, "--sip-objectives"),
        ("quality,safety", "1", "--sip-objective-weights"),
        ("quality", "0.5,0.5", "--sip-objective-weights"),
        ("quality,safety", "0.5,-0.1", "--sip-objective-weights"),
        ("quality,safety", "0.5,abc", "--sip-objective-weights"),
        ("quality,safety", "0.5,nan", "--sip-objective-weights"),
        ("quality,safety", "0,0", "--sip-objective-weights"),
    ],
)
def test_bad_flags_name_the_flag(objectives, weights, flag):
    with pytest.raises(ConfigError) as error:
        RewardConfig(sip_objectives=objectives, sip_objective_weights=weights)
    assert error.value.flag == flag
    assert str(error.value).startswith(flag)


def test_flags_are_generated_from_the_fields():
    parser = build_parser({"rewards": RewardConfig})
    namespace = parser.parse_args(
        ["--sip-objectives", "quality,safety", "--sip-objective-weights", "0.7,0.3"]
    )
    config = config_from_namespace(RewardConfig, namespace)
    assert config.weights() == pytest.approx({"quality": 0.7, "safety": 0.3})
    assert "--sip-objective-weights" in parser.format_help()
    default = config_from_namespace(RewardConfig, parser.parse_args([]))
    assert default.weights() == {"quality": 1.0}


# ---- rewriter RL rewards ---------------------------------------------------------------------


def test_context_is_safe_threshold():
    assert context_is_safe(0.5) is True
    assert context_is_safe(1.0) is True
    assert context_is_safe(0.49) is False
    assert context_is_safe(0.0) is False
    assert context_is_safe(None) is None
    assert context_is_safe(float("nan")) is None


def test_safe_context_rewards_leaving_the_original_alone():
    original = " the cat sat on the mat."
    assert rewriter_reward(original, original, True, None, None) == 1.0
    # Surrounding whitespace does not count as a change; anything inside does.
    assert rewriter_reward(original, "the cat sat on the mat.  \n", True, 0.1, 0.1) == 1.0
    assert rewriter_reward(original, " the cat sat on the mat!", True, 0.9, 1.0) == 0.0
    assert rewriter_reward(original, " The cat sat on the mat.", True, 0.9, 1.0) == 0.0
    assert rewriter_reward(original, " the cat  sat on the mat.", True, 0.9, 1.0) == 0.0


def test_unsafe_context_rewards_quality_and_safety():
    original = "something harmful"
    assert rewriter_reward(original, "something kind", False, 0.6, 1.0) == pytest.approx(0.8)
    assert rewriter_reward(original, "something kind", False, 0.2, 0.4) == pytest.approx(0.3)
    # Copying an unsafe original is scored like any rewrite, not rewarded for equality.
    assert rewriter_reward(original, original, False, 0.5, 0.0) == pytest.approx(0.25)
    assert rewriter_reward(original, "something kind", False, None, 1.0) is None
    assert rewriter_reward(original, "something kind", False, 0.6, None) is None


def test_rewriter_reward_unknown_context_or_rewrite():
    assert rewriter_reward("a", "a", None, 0.5, 0.5) is None
    assert rewriter_reward("a", None, True, 0.5, 0.5) is None


def test_rewriter_rewards_batched():
    rewards = rewriter_rewards(
        originals=["keep me", "keep me", "bad", "bad", "x"],
        rewrites=["keep me", "changed", "good", "good", "x"],
        safety_of_originals=[0.9, 0.9, 0.1, 0.1, None],
        qualities=[None, None, 0.6, None, 0.5],
        safeties=[None, None, 1.0, 1.0, 0.5],
    )
    assert rewards == [1.0, 0.0, pytest.approx(0.8), None, None]
    with pytest.raises(ValueError):
        rewriter_rewards(["a"], ["a", "b"], [1.0], [1.0], [1.0])


# ---- the score store -------------------------------------------------------------------------

JUDGE = judge_identity("oracle", "/data/demo", "prompts-abc")
OTHER_JUDGE = judge_identity("model", "/ckpt/judge-1b", "prompts-abc")


def test_judge_identity_is_stable_and_separates_parts():
    assert judge_identity("oracle", "/data/demo") == judge_identity("oracle", "/data/demo")
    assert judge_identity("oracle", "/data/demo") != judge_identity("oracle", "/data/demo2")
    assert judge_identity("ab", "c") != judge_identity("a", "bc")
    assert isinstance(JUDGE, str) and len(JUDGE) == 32


def test_put_get_and_counters():
    store = ScoreStore()
    assert store.get((0, 3, 17), "original", "safety", JUDGE) is None
    assert store.put((0, 3, 17), "original", "safety", JUDGE, 0.25)
    assert store.get((0, 3, 17), "original", "safety", JUDGE) == 0.25
    # Every part of the entry key matters.
    assert store.get((0, 3, 18), "original", "safety", JUDGE) is None
    assert store.get((1, 3, 17), "original", "safety", JUDGE) is None
    assert store.get((0, 3, 17), "rewrite", "safety", JUDGE) is None
    assert store.get((0, 3, 17), "original", "quality", JUDGE) is None
    assert len(store) == 1
    assert (store.hits, store.misses) == (1, 5)
    assert store.hit_rate == pytest.approx(1 / 6)
    assert ((0, 3, 17), "original", "safety", JUDGE) in store
    assert (store.hits, store.misses) == (1, 5)  # membership is not a lookup


def test_judge_identity_separates_entries():
    store = ScoreStore()
    store.put((0, 1, 2), "rewrite", "quality", JUDGE, 0.9)
    store.put((0, 1, 2), "rewrite", "quality", OTHER_JUDGE, 0.1)
    assert len(store) == 2
    assert store.get((0, 1, 2), "rewrite", "quality", JUDGE) == 0.9
    assert store.get((0, 1, 2), "rewrite", "quality", OTHER_JUDGE) == 0.1
    assert store.get((0, 1, 2), "rewrite", "quality", judge_identity("third")) is None


def test_missing_scores_are_not_stored():
    store = ScoreStore()
    assert not store.put((0, 1, 2), "original", "quality", JUDGE, None)
    assert not store.put((0, 1, 2), "original", "quality", JUDGE, float("nan"))
    assert len(store) == 0
    store.put((0, 1, 2), "original", "quality", JUDGE, 0.5)
    assert not store.put((0, 1, 2), "original", "quality", JUDGE, None)  # keeps the old score
    assert store.get((0, 1, 2), "original", "quality", JUDGE) == 0.5


def test_bad_entry_parts_are_rejected():
    store = ScoreStore()
    with pytest.raises(ValueError):
        store.put((0, 1, 2), "rollout", "quality", JUDGE, 0.5)
    with pytest.raises(ValueError):
        store.put((0, 1, 2), "original", "coherence", JUDGE, 0.5)
    with pytest.raises(ValueError):
        store.put((0, 1), "original", "quality", JUDGE, 0.5)
    with pytest.raises(ValueError):
        ScoreStore(max_entries=0)


def test_many_and_numpy_keys():
    np = pytest.importorskip("numpy")
    store = ScoreStore()
    keys = [(0, 1, 2), (np.int64(0), np.int64(5), np.int64(9)), (1, 1, 1)]
    assert store.put_many(keys, "rewrite", "safety", JUDGE, [0.1, np.float32(0.5), None]) == 2
    assert store.get_many([(0, 1, 2), (0, 5, 9), (1, 1, 1)], "rewrite", "safety", JUDGE) == [
        pytest.approx(0.1),
        0.5,
        None,
    ]
    assert (store.hits, store.misses) == (2, 1)


def _filled(max_entries=None):
    store = ScoreStore(max_entries=max_entries)
    store.put((0, 1, 2), "original", "quality", JUDGE, 0.5)
    store.put((0, 1, 2), "rewrite", "quality", JUDGE, 0.75)
    store.put((0, 1, 2), "rewrite", "safety", OTHER_JUDGE, 1.0)
    store.put((2, 40000, 123456), "original", "factuality", OTHER_JUDGE, 0.1234567890123)
    store.get((0, 1, 2), "original", "quality", JUDGE)
    store.get((9, 9, 9), "original", "quality", JUDGE)
    return store


def _entries(store):
    return {
        (key, kind, objective, judge): store.get(key, kind, objective, judge)
        for key, kind, objective, judge in [
            ((0, 1, 2), "original", "quality", JUDGE),
            ((0, 1, 2), "rewrite", "quality", JUDGE),
            ((0, 1, 2), "rewrite", "safety", OTHER_JUDGE),
            ((2, 40000, 123456), "original", "factuality", OTHER_JUDGE),
        ]
    }


def _check_restored(restored, store):
    assert len(restored) == len(store) == 4
    assert (restored.hits, restored.misses) == (store.hits, store.misses)
    assert restored.state_dict() == store.state_dict()
    assert _entries(restored) == _entries(store)  # exact floats


def test_state_dict_round_trip_through_torch(tmp_path):
    store = _filled()
    state = store.state_dict()
    assert len(state["judges"]) == 2  # each identity stored once
    path = tmp_path / "common.pt"
    torch.save({"score_store": state}, path)
    restored = ScoreStore()
    restored.load_state_dict(torch.load(path, weights_only=True)["score_store"])
    _check_restored(restored, store)


def test_state_dict_round_trip_through_json():
    store = _filled()
    restored = ScoreStore()
    restored.load_state_dict(json.loads(json.dumps(store.state_dict())))
    _check_restored(restored, store)


def test_load_replaces_contents_and_respects_own_bound():
    store = _filled()
    restored = ScoreStore(max_entries=2)
    restored.put((5, 5, 5), "original", "safety", JUDGE, 0.3)
    restored.load_state_dict(store.state_dict())
    assert len(restored) == 2
    assert restored.get((5, 5, 5), "original", "safety", JUDGE) is None
    # The two oldest were evicted, the two newest kept.
    assert restored.get((0, 1, 2), "original", "quality", JUDGE) is None
    assert restored.get((0, 1, 2), "rewrite", "safety", OTHER_JUDGE) == 1.0
    with pytest.raises(ValueError):
        restored.load_state_dict({**store.state_dict(), "version": 99})


def test_bounded_store_evicts_oldest_first():
    store = ScoreStore(max_entries=3)
    for document in range(5):
        store.put((0, document, 0), "original", "quality", JUDGE, document / 10)
    assert len(store) == 3
    assert store.evictions == 2
    assert store.get_many([(0, d, 0) for d in range(5)], "original", "quality", JUDGE) == [
        None,
        None,
        pytest.approx(0.2),
        pytest.approx(0.3),
        pytest.approx(0.4),
    ]
    # Overwriting keeps the entry's place in line: document 2 is still the oldest.
    store.put((0, 2, 0), "original", "quality", JUDGE, 0.9)
    store.put((0, 5, 0), "original", "quality", JUDGE, 0.5)
    assert store.get((0, 2, 0), "original", "quality", JUDGE) is None
    assert store.get((0, 3, 0), "original", "quality", JUDGE) == pytest.approx(0.3)


def _store_checkpoint_worker(root: str) -> None:
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint

    from . import workers

    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    store = ScoreStore()
    store.put((0, 12, 345), "rewrite", "safety", "judge-x", 0.25)
    store.put((1, 2, 3), "original", "quality", "judge-y", 0.5)
    save_checkpoint(root, 1, chunks, extra_common={"score_store": store.state_dict()})
    loaded = load_checkpoint(root, chunks)
    resumed = ScoreStore()
    resumed.load_state_dict(loaded.extra["score_store"])
    assert resumed.get((0, 12, 345), "rewrite", "safety", "judge-x") == 0.25
    assert resumed.get((1, 2, 3), "original", "quality", "judge-y") == 0.5
    assert len(resumed) == 2
    destroy_distributed()


@pytest.mark.slow
def test_score_store_travels_with_checkpoints(tmp_path):
    from .distributed import run_ranks

    run_ranks(_store_checkpoint_worker, 1, str(tmp_path / "ckpt"))
