"""Training health checks: catch a run that degenerates while its loss looks fine.

A policy stage (DPO, PPO, GRPO, RLOO) checks itself every ``health.every`` steps, and once before
training (the baseline): a probe samples a few held-out prompts (written to ``samples.jsonl``)
and measures KL to the reference, response length, repetition, invalid-token rate and, on the
builtin task, the gold reward; the trainer adds what it logs (DPO's chosen log-probs, reward
accuracy and margins; PPO/GRPO's reward). :class:`HealthMonitor` compares those values with the
thresholds below. A tripped check prints one warning line (metric, step, threshold), is kept in
the stage's ``health.json`` (copied into ``stage.json`` under ``health``, shown by ``alignkit
status``), and with ``on_trip: stop`` stops the stage at once: no checkpoint is written after
the trip, so the last one kept is the last good one.

The checks:
- ``dpo_collapse``: the chosen responses' log-prob fell more than ``collapse_logp_drop`` nats
  below its value at the first check while the reward accuracy still reads above 0.5 (the policy
  pushes both responses down, the rejected one faster).
- ``kl_limit``: KL to the reference (nats per sequence) above ``max_kl``.
- ``kl_growth``: KL up by more than ``kl_growth_rate`` at each of the last ``kl_growth_checks``
  checks and above ``kl_growth_min``: growing without bound.
- ``length``: mean response length outside [baseline / ``length_ratio``, baseline ×
  ``length_ratio``].
- ``repetition``: share of repeated token 3-grams above ``max_repetition`` (and above baseline).
- ``invalid_tokens``: share of invalid tokens (undecodable bytes, unknown tokens; on the builtin
  task, words outside its vocabulary) above ``max_invalid`` (and above baseline).
- ``reward_vs_gold``: the training reward is above its value at the best gold check while the
  held-out gold reward fell more than ``gold_drop`` below that best (reward hacking).
- ``rm_blind_spots`` (PPO on a reward_model stage, before training): the RM's sanity probe
  (:mod:`alignkit.rewards.sanity`) flagged degenerate answers it scores above real ones. It
  needs no gold and fires before the policy has moved at all.
- ``reward_vs_heldout_rm``: the same with a second, held-out reward model in place of gold
  (PPO's ``heldout_reward_model``): reward hacking seen without a gold reward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from rich.console import Console
from rich.markup import escape

from alignkit.config import MaxNewTokens, Samples, Strict
from alignkit.errors import UserError
from alignkit.rundir import read_json_or_none, write_json_atomic
from alignkit.tracking import NO_TRACKING, StageTracker

HEALTH_FILE = "health.json"
SAMPLES_FILE = "samples.jsonl"


class HealthSpec(Strict):
    """The health checks of a policy stage and their thresholds (see the module's list)."""

    enabled: bool = True
    """Run the checks (each costs one probe: a few sampled prompts)."""
    on_trip: Literal["warn", "stop"] = "warn"
    """``warn``: print, record and go on. ``stop``: also stop the stage (exit 2), keeping the
    checkpoints written before the trip."""
    every: int = Field(20, gt=0)
    """Steps between checks (each samples ``sample_prompts`` prompts)."""
    sample_prompts: int = Field(8, gt=0)
    """Prompts the probe samples at each check (the same ones every time)."""
    samples_per_prompt: Samples = 2
    """Completions per probe prompt."""
    max_new_tokens: MaxNewTokens = 40
    """New tokens per probe completion."""
    prompts: str | None = None
    """Prompt source; default: the held-out prompts of the stage (``heldout.prompts``, the
    builtin test prompts on builtin data), else the stage's own data."""
    collapse_logp_drop: float = Field(10.0, gt=0)
    """``dpo_collapse``: nats the chosen log-prob may fall below its first value."""
    max_kl: float = Field(30.0, gt=0)
    """``kl_limit``: KL to the reference (nats per sequence) above which it trips."""
    kl_growth_checks: int = Field(5, gt=0)
    """``kl_growth``: consecutive checks at which the KL must have grown."""
    kl_growth_rate: float = Field(0.2, gt=0)
    """``kl_growth``: the least relative growth at each of those checks."""
    kl_growth_min: float = Field(5.0, ge=0)
    """``kl_growth``: KL (nats per sequence) below which growth is not judged."""
    length_ratio: float = Field(2.0, gt=1)
    """``length``: how many times shorter or longer than at the first check answers may get."""
    max_repetition: float = Field(0.5, gt=0, le=1)
    """``repetition``: the highest share of repeated token 3-grams."""
    max_invalid: float = Field(0.2, gt=0, le=1)
    """``invalid_tokens``: the highest share of invalid tokens (or words, on the builtin task)."""
    gold_drop: float = Field(0.1, gt=0)
    """``reward_vs_gold``: how far the gold reward may fall below its best while the training
    reward is above its value then."""
    heldout_reward_drop: float = Field(0.3, gt=0)
    """``reward_vs_heldout_rm`` (PPO with ``heldout_reward_model``): how far the held-out RM's
    score may fall below its best, in units of its std on the starting policy's samples."""


def health_summary(out_dir: Path) -> dict | None:
    """What ``stage.json`` records of a stage's checks: their count, the trips, the last values."""
    saved = read_json_or_none(out_dir / HEALTH_FILE)
    if not isinstance(saved, dict):
        return None
    history = saved.get("history", [])
    return {
        "checks": len(history),
        "trips": saved.get("trips", []),
        "last": history[-1] if history else {},
    }


class HealthStop(UserError):
    """A health check tripped with ``on_trip: stop``."""


@dataclass
class Trip:
    check: str
    step: int
    metric: str
    value: float
    threshold: float
    message: str


class HealthMonitor:
    """Keeps the checks' history in ``out_dir/health.json`` (so a resumed stage keeps its
    baseline and its trips) and applies the thresholds of a :class:`HealthSpec`."""

    def __init__(
        self,
        spec: HealthSpec,
        where: str,
        out_dir: Path,
        console: Console | None = None,
        tracker: StageTracker = NO_TRACKING,
    ):
        self.spec, self.where, self.path = spec, where, out_dir / HEALTH_FILE
        self.console = console or Console(stderr=True)
        self.tracker = tracker
        self.history: list[dict] = []
        self.trips: list[Trip] = []
        saved = read_json_or_none(self.path)
        if isinstance(saved, dict):
            self.history = saved.get("history", [])
            self.trips = [Trip(**t) for t in saved.get("trips", [])]

    @property
    def has_baseline(self) -> bool:
        return bool(self.history)

    def observe(self, step: int, values: dict[str, float]) -> list[Trip]:
        """Record one check's values; print, save and return the checks that trip now (each
        check trips once); raise :class:`HealthStop` when one does and ``on_trip`` is stop."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        self.history.append({"step": step, **values})
        tripped = {t.check for t in self.trips}
        new = [t for t in self._checks(step) if t.check not in tripped]
        self.trips.extend(new)
        self._save()
        self.tracker.log(values, step, prefix="health/")
        for trip in new:
            self.tracker.log({trip.check: 1.0}, step, prefix="health/trip/")
            self.tracker.text(
                "health/trips", f"**{trip.check}** (step {step}): {trip.message}", step
            )
        for trip in new:
            self.console.print(
                f"[bold yellow]health warning[/] {escape(self.where)} step {trip.step}: "
                f"{escape(trip.message)}"
            )
        if new and self.spec.on_trip == "stop":
            raise HealthStop(
                f"{self.where}: stopped at step {step} by the health check {new[0].check}: "
                f"{new[0].message}. Checkpoints written before this step are kept; lower the "
                f"learning rate (or raise the KL coefficient / beta), or set "
                f"{self.where}.health.on_trip: warn"
            )
        return new

    def _save(self) -> None:
        data = {"history": self.history, "trips": [asdict(t) for t in self.trips]}
        write_json_atomic(self.path, data)

    # --- the checks -----------------------------------------------------------------------
    def _series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if key in h]

    def _proxy_vs_truth(self, key: str, drop: float) -> tuple[dict, float] | None:
        """(the check with the best ``key``, the value now) when the training reward is above its
        value at that check while ``key`` fell more than ``drop`` below its best; else None."""
        now = self.history[-1]
        if key not in now or "reward" not in now or len(self._series(key)) < 2:
            return None
        best = max((h for h in self.history if key in h and "reward" in h), key=lambda h: h[key])
        if now[key] < best[key] - drop and now["reward"] > best["reward"]:
            return best, now[key]
        return None

    def _checks(self, step: int) -> list[Trip]:
        s, now, first = self.spec, self.history[-1], self.history[0]
        trips: list[Trip] = []

        def trip(check, metric, value, threshold, message):
            trips.append(Trip(check, step, metric, value, threshold, message))

        chosen = self._series("chosen_logp")
        if chosen and "chosen_logp" in now and now.get("accuracy", 0.0) > 0.5:
            drop = chosen[0] - now["chosen_logp"]
            if drop > s.collapse_logp_drop:
                trip("dpo_collapse", "chosen_logp", now["chosen_logp"], s.collapse_logp_drop,
                     f"chosen log-prob {now['chosen_logp']:.1f} fell {drop:.1f} nats below its "
                     f"start {chosen[0]:.1f} (limit {s.collapse_logp_drop:g}) while reward "
                     f"accuracy reads {now['accuracy']:.2f}: DPO collapse")  # fmt: skip
        kl = self._series("kl")
        if "kl" in now and now["kl"] > s.max_kl:
            trip("kl_limit", "kl", now["kl"], s.max_kl,
                 f"KL to the reference {now['kl']:.2f} nats/seq above max_kl {s.max_kl:g}")  # fmt: skip
        n = s.kl_growth_checks
        if "kl" in now and len(kl) > n and now["kl"] > s.kl_growth_min:
            recent = kl[-n - 1 :]
            steps = zip(recent, recent[1:], strict=False)
            if all(b > max(a, a * (1 + s.kl_growth_rate)) for a, b in steps):
                trip("kl_growth", "kl", now["kl"], s.kl_growth_min,
                     f"KL to the reference rose at each of the last {n} checks to "
                     f"{now['kl']:.2f} nats/seq (each by > {s.kl_growth_rate:.0%}): growing "
                     "without bound")  # fmt: skip
        if "length" in now and "length" in first and first["length"] > 0:
            low, high = first["length"] / s.length_ratio, first["length"] * s.length_ratio
            if not low <= now["length"] <= high:
                word = "collapsed" if now["length"] < low else "exploded"
                trip("length", "length", now["length"], low if now["length"] < low else high,
                     f"response length {word}: {now['length']:.1f} tokens vs {first['length']:.1f} "
                     f"at the start (allowed {low:.1f}-{high:.1f})")  # fmt: skip
        for key, limit, check in (
            ("repetition", s.max_repetition, "repetition"),
            ("invalid", s.max_invalid, "invalid_tokens"),
        ):
            if key in now and now[key] > max(limit, first.get(key, 0.0)):
                trip(check, key, now[key], limit,
                     f"{key} rate {now[key]:.2f} above {limit:g} (start {first.get(key, 0):.2f})")  # fmt: skip
        if now.get("rm_flagged", 0) > 0:
            trip("rm_blind_spots", "rm_flagged", now["rm_flagged"], 0,
                 f"the reward model's sanity probe flagged {now['rm_flagged']:g} kind(s) of "
                 "degenerate answer (empty, '.', 1-3 words, fragments, repeats) scoring above "
                 "its held-out chosen answers (see its rm_probe.json): the policy will find them. "
                 "Train the RM on comparisons of the policy's own samples (a rollout stage in "
                 "reward_model.mix)")  # fmt: skip
        for key, drop, check, what in (
            ("gold", s.gold_drop, "reward_vs_gold", "held-out gold"),
            ("heldout_reward", s.heldout_reward_drop, "reward_vs_heldout_rm", "held-out RM score"),
        ):
            found = self._proxy_vs_truth(key, drop)
            if found is not None:
                best, value = found
                trip(check, key, value, best[key] - drop,
                     f"training reward rose ({best['reward']:.3f} -> {now['reward']:.3f}) while "
                     f"{what} fell {best[key]:.3f} -> {value:.3f} (more than {drop:g} below its "
                     f"best, step {best['step']}): reward hacking")  # fmt: skip
        return trips
