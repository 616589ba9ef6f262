"""Name a reward function: ``resolve_reward(spec) -> (name, fn)``; combine several with weights.

A spec is one of
- ``gold``: the builtin task's hidden gold reward (:mod:`alignkit.rewards.gold`);
  ``gold_content``: its content term alone (sentiment balance, no format terms);
  ``gold_valid``: 1 when every word of the answer is in the task's vocabulary, else 0;
- a rule from :mod:`alignkit.rewards.rules`, optionally with parameters: ``length``,
  ``"length(max_words=50)"``, ``"format(pattern='^Answer:')"`` (values are Python literals);
- ``module:function``: any importable reward function, e.g. ``my_pkg.rewards:brevity``;
- a directory: a reward-model stage (``RUN_DIR/rm``), a sequence-classification checkpoint or
  a ``SEQ_CLS`` adapter, scored by :class:`alignkit.rewards.reward_model.RewardModelScorer`.

Weights: ``resolve_rewards(["gold", "length*0.2"])`` (or ``[("gold", 1.0), ("length", 0.2)]``)
gives a :class:`WeightedReward` whose value is ``sum(weight * reward)``; each component's value
is kept too. A spec ends with ``*WEIGHT`` only when WEIGHT is a number.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from alignkit.errors import UserError
from alignkit.rewards import gold, rules
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.rundir import STAGE_FILE

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
GOLD = {  # the builtin task's measures
    "gold": "gold_reward",
    "gold_content": "gold_content",
    "gold_valid": "gold_valid",
}
ACCEPTED = (
    "gold, gold_content, a rule ({rules}), module:function, or a reward-model directory "
    "(a reward-model stage, a sequence-classification checkpoint or adapter)"
)


def known_names() -> list[str]:
    return [*GOLD, *rules.RULES, *rules.ALIASES]


def resolve_reward(spec: str) -> tuple[str, RewardFn]:
    """The reward function a spec names, and the name to report its values under."""
    spec = spec.strip()
    if spec in GOLD:
        return spec, getattr(gold, GOLD[spec])
    name, _, args = spec.partition("(")
    if name.strip() in rules.RULES or name.strip() in rules.ALIASES:
        return spec, _rule(name.strip(), args, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return spec, _reward_model(path)
    if ":" in spec and not path.exists():
        return spec, _import_function(spec)
    accepted = ACCEPTED.format(rules=", ".join(rules.RULES))
    close = difflib.get_close_matches(name.strip(), known_names(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if path.suffix or "/" in spec:
        raise UserError(f"--reward {spec!r}: no such directory{hint}. A reward is {accepted}")
    raise UserError(f"--reward {spec!r}: unknown reward{hint}. A reward is {accepted}")


def _rule(name: str, args: str, spec: str) -> RewardFn:
    fn = rules.RULES[rules.ALIASES.get(name, name)]
    params = _parse_params(args, spec) if args else {}
    allowed = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    for key in params:
        if key not in allowed:
            raise UserError(
                f"--reward {spec!r}: rule {name!r} has no parameter {key!r}; "
                f"its parameters: {', '.join(allowed) or 'none'}"
            )
    try:  # a missing required parameter (format's pattern) fails here, not mid-job
        inspect.signature(fn).bind(None, None, **params)
    except TypeError as e:
        raise UserError(f"--reward {spec!r}: {e}; write {name}(key=value, ...)") from None
    # a partial of a module-level function stays picklable (TRL's async reward workers)
    return functools.update_wrapper(functools.partial(fn, **params), fn)


def _parse_params(args: str, spec: str) -> dict:
    """``key=value, ...)`` (the text after ``NAME(``) as a dict of Python literals."""
    try:
        call = ast.parse("f(" + args, mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError("expected NAME(key=value, ...)")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise UserError(
            f"--reward {spec!r}: cannot read the parameters ({e}); write NAME(key=value, ...) "
            "with Python literals, e.g. length(max_words=50)"
        ) from None


def _import_function(spec: str) -> RewardFn:
    """Import ``module:function``. This runs that module's code, as any Python import does:
    name only code you trust (a config from someone else can name any module)."""
    module_name, _, attr = spec.partition(":")
    log.warning("reward %r: importing and running code from module %r", spec, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--reward {spec!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"--reward {spec!r}: module {module_name!r} has no {attr!r}{hint}")
    if not callable(fn):
        raise UserError(f"--reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _reward_model(path: Path) -> RewardFn:
    _check_reward_model_dir(path)
    return RewardModelScorer.from_path(path)


def _check_reward_model_dir(path: Path) -> None:
    """Refuse a directory that is clearly not a reward model before loading anything."""
    if (path / STAGE_FILE).is_file():  # the scorer checks the stage's kind
        return
    adapter = _read_json(path / "adapter_config.json")
    if adapter is not None:
        if adapter.get("task_type") != "SEQ_CLS":
            raise UserError(
                f"--reward {path}: an adapter with task_type {adapter.get('task_type')!r}, "
                "not a reward model (SEQ_CLS)"
            )
        return
    config = _read_json(path / "config.json")
    archs = (config or {}).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"--reward {path}: not a reward model (no stage.json, no SEQ_CLS adapter, no "
            f"*ForSequenceClassification checkpoint; architectures: {archs or 'none'})"
        )


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class WeightedReward:
    """Several rewards and their weights; calling it gives ``sum(weight * value)`` per completion
    (a component's ``None``, TRL's "not applicable", counts as 0 in the sum)."""

    def __init__(self, components: list[tuple[str, RewardFn, float]]):
        names = [n for n, _, _ in components]
        if len(set(names)) != len(names):
            raise UserError(f"--reward: the same reward named twice in {names}")
        self.components = components
        self.__name__ = "+".join(f"{w:g}*{n}" if w != 1 else n for n, _, w in components)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.components]

    def score(self, prompts, completions, **meta) -> dict[str, list[float | None]]:
        """Every component's values, by name."""
        out = {}
        for name, fn, _ in self.components:
            values = list(fn(prompts=prompts, completions=completions, **meta))
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {name!r} returned {len(values)} values for {len(completions)} completions"
                )
            out[name] = [None if v is None else float(v) for v in values]
        return out

    def total(self, scores: dict[str, list[float | None]]) -> list[float]:
        weights = {n: w for n, _, w in self.components}
        columns = [[(v or 0.0) * weights[n] for v in vals] for n, vals in scores.items()]
        return [math.fsum(col) for col in zip(*columns, strict=True)]

    def __call__(self, prompts, completions, **meta) -> list[float]:
        return self.total(self.score(prompts, completions, **meta))


def resolve_rewards(specs: Sequence[str | tuple[str, float]]) -> WeightedReward:
    """Resolve ``["gold", "length*0.2"]`` or ``[("gold", 1.0), ("length", 0.2)]``."""
    components = []
    for item in specs:
        spec, weight = item if isinstance(item, tuple) else split_weight(item)
        name, fn = resolve_reward(spec)
        components.append((name, fn, float(weight)))
    return WeightedReward(components)


def split_weight(spec: str) -> tuple[str, float]:
    """``"length*0.2"`` -> ``("length", 0.2)``; a spec without a numeric ``*WEIGHT`` weighs 1."""
    head, star, tail = spec.rpartition("*")
    if star:
        try:
            return head.strip(), float(tail)
        except ValueError:
            pass
    return spec, 1.0
