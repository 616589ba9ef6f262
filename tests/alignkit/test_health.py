"""Health checks: each threshold trips on the pattern it names and stays quiet otherwise."""

import json

import pytest

from alignkit.health import HealthMonitor, HealthSpec, HealthStop, health_summary
from alignkit.pipeline import _health


def monitor(tmp_path, **spec):
    return HealthMonitor(HealthSpec(**spec), "stages.dpo", tmp_path)


def feed(m, rows):
    trips = []
    for step, values in rows:
        trips += m.observe(step, values)
    return trips


def test_dpo_collapse_trips_when_chosen_logp_falls_while_accuracy_reads_high(tmp_path):
    m = monitor(tmp_path)
    trips = feed(m, [(0, {"chosen_logp": -60, "accuracy": 0.0}),
                     (20, {"chosen_logp": -64, "accuracy": 0.7}),
                     (40, {"chosen_logp": -75, "accuracy": 0.8}),
                     (60, {"chosen_logp": -90, "accuracy": 0.8})])  # fmt: skip
    assert [(t.check, t.step) for t in trips] == [("dpo_collapse", 40)]  # each check trips once
    assert "fell 15.0 nats" in trips[0].message and trips[0].threshold == 10.0


def test_falling_chosen_logp_with_chance_accuracy_is_not_collapse(tmp_path):
    m = monitor(tmp_path)
    assert not feed(m, [(0, {"chosen_logp": -60}), (20, {"chosen_logp": -80, "accuracy": 0.5})])


def test_kl_limit_and_unbounded_growth(tmp_path):
    m = monitor(tmp_path, max_kl=30, kl_growth_checks=3, kl_growth_min=5)
    trips = feed(m, [(i, {"kl": kl}) for i, kl in enumerate([0.5, 4, 4.5, 6, 8, 11, 40])])
    assert [(t.check, t.step) for t in trips] == [("kl_growth", 5), ("kl_limit", 6)]
    calm = monitor(tmp_path / "calm", kl_growth_checks=3)
    (tmp_path / "calm").mkdir(exist_ok=True)
    assert not feed(calm, [(i, {"kl": kl}) for i, kl in enumerate([0, 1, 2, 2.5, 2.8, 3, 3])])


def test_length_collapse_and_explosion_against_the_baseline(tmp_path):
    trips = feed(monitor(tmp_path), [(0, {"length": 20}), (1, {"length": 12}), (2, {"length": 9})])
    assert [(t.check, t.step) for t in trips] == [("length", 2)] and "collapsed" in trips[0].message
    (tmp_path / "b").mkdir()
    trips = feed(monitor(tmp_path / "b"), [(0, {"length": 20}), (1, {"length": 41})])
    assert "exploded" in trips[0].message


def test_repetition_and_invalid_tokens_above_limit_and_start(tmp_path):
    m = monitor(tmp_path, max_repetition=0.5, max_invalid=0.2)
    trips = feed(m, [(0, {"repetition": 0.1, "invalid": 0.05}),
                     (1, {"repetition": 0.4, "invalid": 0.1}),
                     (2, {"repetition": 0.7, "invalid": 0.3})])  # fmt: skip
    assert {t.check for t in trips} == {"repetition", "invalid_tokens"}
    assert all(t.step == 2 for t in trips)


def test_reward_rising_while_gold_falls_is_reward_hacking(tmp_path):
    m = monitor(tmp_path, gold_drop=0.1)
    trips = feed(m, [(0, {"reward": 0.0, "gold": 0.0}), (1, {"reward": 1.0, "gold": 0.2}),
                     (2, {"reward": 2.0, "gold": 0.15}), (3, {"reward": 3.0, "gold": 0.05})])  # fmt: skip
    assert [(t.check, t.step) for t in trips] == [("reward_vs_gold", 3)]
    (tmp_path / "ok").mkdir()
    both_fall = monitor(tmp_path / "ok")
    assert not feed(
        both_fall, [(0, {"reward": 1.0, "gold": 0.3}), (1, {"reward": 0.5, "gold": 0.1})]
    )


def test_training_reward_rising_while_a_heldout_rm_falls_trips_without_gold(tmp_path):
    m = monitor(tmp_path, heldout_reward_drop=0.3)
    trips = feed(m, [(0, {"reward": 0.0, "heldout_reward": 0.0}),
                     (10, {"reward": 1.0, "heldout_reward": 0.4}),
                     (20, {"reward": 2.0, "heldout_reward": 0.2}),
                     (30, {"reward": 3.0, "heldout_reward": 0.0})])  # fmt: skip
    assert [(t.check, t.step) for t in trips] == [("reward_vs_heldout_rm", 30)]
    assert "held-out RM score fell 0.400 -> 0.000" in trips[0].message
    (tmp_path / "ok").mkdir()
    agree = monitor(tmp_path / "ok")
    assert not feed(agree, [(0, {"reward": 0.0, "heldout_reward": 0.0}),
                            (10, {"reward": 2.0, "heldout_reward": 1.5})])  # fmt: skip


def test_stop_raises_and_the_record_survives_for_status_and_resume(tmp_path):
    m = monitor(tmp_path, on_trip="stop")
    m.observe(0, {"kl": 1.0, "length": 10})
    with pytest.raises(HealthStop, match=r"stopped at step 7 by the health check kl_limit.*kept"):
        m.observe(7, {"kl": 99.0, "length": 10})
    summary = health_summary(tmp_path)
    assert summary["checks"] == 2 and summary["trips"][0]["check"] == "kl_limit"
    assert _health(tmp_path)["health"]["last"]["kl"] == 99.0
    again = monitor(tmp_path)  # a resumed stage keeps its baseline and its trips
    assert again.has_baseline and [t.check for t in again.trips] == ["kl_limit"]
    assert json.loads((tmp_path / "health.json").read_text())["history"][0]["step"] == 0
