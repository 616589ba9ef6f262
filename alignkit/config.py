"""Pipeline configuration: pydantic schemas for the YAML, validated once at the edge.

A pipeline file has ``run``, ``model``, ``adapter`` and ``stages``. The shared blocks live here;
each stage kind's own schema lives beside its stage (``stages/sft.py``) and is found through the
stage registry, so the core never imports a stage. Every model forbids unknown keys, and
:func:`load_pipeline` turns pydantic's errors into messages that name the key, where it is and
the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from alignkit.errors import UserError
from alignkit.rundir import RESERVED_NAMES

BUILTIN_MODEL = "builtin:tiny"
_STAGE_NAME = re.compile(r"[\w.-]{1,100}")


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,  # a field's docstring is its description (see reference.py)
    )


class RunSpec(Strict):
    name: str = "run"
    """Shown in logs and the manifest."""
    dir: str | None = None
    """Run directory; default ``runs/<name>``. ``alignkit run --run-dir`` overrides it."""
    seed: int = 0
    """Seed for data shuffling, adapter init and sampling; each stage derives its own from it."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers every stage logs to, each under its stage name (see
    :mod:`alignkit.tracking`); empty (or ``none``): files only. Not part of any stage's hash."""
    tracking_dir: str | None = None
    """Where the trackers write (TensorBoard event files, W&B offline runs, the MLflow file
    store); default ``<run dir>/tracking``."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, v):
        if isinstance(v, str):  # ``report_to: tensorboard`` / ``none`` as in transformers
            return [] if v == "none" else [v]
        return v


class ModelSpec(Strict):
    name: str = BUILTIN_MODEL
    """Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), local path, or ``builtin:tiny``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in every stage.json."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on a GPU that supports it, float32 on CPU."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """bitsandbytes quantization of the frozen base (QLoRA with ``4bit``)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."""
    trust_remote_code: bool = False
    """Run code shipped with a Hub model. Off unless you trust the repository."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``)."""


#: LoRA initialisations that move the adapter's starting point into the base weights (PiSSA's
#: principal singular vectors, OLoRA's QR factors): the base is changed in memory, so the
#: trained adapter is converted before saving to apply to the original base.
BASE_CHANGING_INITS = ("pissa", "olora")
_LORA_INIT = re.compile(r"default|gaussian|olora|pissa|pissa_niter_[1-9][0-9]*")


class AdaLoraSpec(Strict):
    """AdaLoRA's rank budget schedule (``adapter.type: adalora``): every module starts at
    ``init_r``; after a warm-up the least important singular triplets are pruned (cubic schedule)
    until the average rank is the adapter's ``r``, then the ranks stay fixed to the end."""

    init_r: int | None = Field(None, gt=0)
    """Starting rank of every adapted module (``r`` is the average rank at the end); default
    ``1.5 * r``, peft's own ratio (12 for 8)."""
    tinit: float = Field(0.1, ge=0, lt=1)
    """Share of the training steps before pruning starts (warm-up at ``init_r``)."""
    tfinal: float = Field(0.2, ge=0, lt=1)
    """Share of the training steps at the end with the ranks fixed."""
    delta_t: int = Field(1, gt=0)
    """Steps between two budget re-allocations during pruning."""
    orth_reg_weight: float = Field(0.5, ge=0)
    """Weight of the orthogonality penalty on P and Q (added where the model computes the loss:
    SFT; DPO computes its own loss and does not get it)."""

    @model_validator(mode="after")
    def _check(self) -> AdaLoraSpec:
        if self.tinit + self.tfinal >= 1:
            raise ValueError("tinit + tfinal must be below 1: no steps would be left for pruning")
        return self


class AdapterSpec(Strict):
    type: Literal["lora", "adalora", "full", "ia3", "prefix", "prompt"] = "lora"
    """``lora`` (QLoRA when the base is 4-bit), ``full`` fine-tuning, or another PEFT method
    (``adalora``: LoRA with a rank budget, see ``adalora``)."""
    r: int = Field(16, gt=0)
    """LoRA rank (AdaLoRA: the average rank the budget ends at)."""
    alpha: float = 32
    """LoRA scaling numerator: updates are scaled by ``alpha / r``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout probability on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """LoRA/IA3 target modules: a list of module names or ``all-linear``."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output beside the LoRA direction."""
    use_rslora: bool = False
    """rsLoRA: scale by ``alpha / sqrt(r)``, steadier at high ranks."""
    num_virtual_tokens: int = Field(20, gt=0)
    """Prefix and prompt tuning: number of virtual tokens."""
    modules_to_save: list[str] = []
    """Extra modules trained in full and saved with the adapter (e.g. ``embed_tokens``)."""
    init_lora_weights: str = "default"
    """LoRA initialisation: ``default`` (B = 0, Kaiming A), ``gaussian`` (B = 0, Gaussian A),
    ``pissa`` / ``pissa_niter_N`` (principal singular vectors; N: randomized SVD iterations) or
    ``olora`` (QR). PiSSA and OLoRA move those components out of the base weights; the saved
    adapter is converted (rank 2r) to apply to the original base."""
    loraplus_ratio: float | None = Field(None, ge=1)
    """LoRA+: the B matrices learn this many times faster than A (the paper suggests 16);
    ``null`` trains both at the trainer's learning rate."""
    adalora: AdaLoraSpec = AdaLoraSpec()
    """AdaLoRA's budget schedule (``type: adalora`` only)."""

    @model_validator(mode="after")
    def _check_lora_options(self) -> AdapterSpec:
        if not _LORA_INIT.fullmatch(self.init_lora_weights):
            raise ValueError(
                f"init_lora_weights: {self.init_lora_weights!r} is not one of default, gaussian, "
                "pissa, pissa_niter_N (N >= 1), olora"
            )
        if self.init_lora_weights != "default" and self.type != "lora":
            raise ValueError(f"init_lora_weights applies to type: lora, not {self.type!r}")
        if self.loraplus_ratio is not None and self.type != "lora":
            raise ValueError(f"loraplus_ratio applies to type: lora, not {self.type!r}")
        if self.changes_base_weights and (self.modules_to_save or self.use_dora):
            raise ValueError(
                f"init_lora_weights: {self.init_lora_weights} cannot be combined with "
                "modules_to_save or use_dora: peft's conversion to the original base keeps only "
                "the LoRA matrices"
            )
        if self.type == "adalora" and (self.use_dora or self.use_rslora):
            raise ValueError("use_dora and use_rslora are LoRA options; AdaLoRA has neither")
        init_r = self.adalora.init_r
        if self.type == "adalora" and init_r is not None and init_r < self.r:
            raise ValueError(f"adalora.init_r ({self.adalora.init_r}) must be >= r ({self.r})")
        return self

    @property
    def saved_type(self) -> str:
        """The adapter type a stage saves (and stage.json records): AdaLoRA is saved as the LoRA
        adapter it amounts to (see :func:`alignkit.adapters.save_adalora_as_lora`)."""
        return "lora" if self.type == "adalora" else self.type

    @property
    def changes_base_weights(self) -> bool:
        """Whether creating this adapter rewrites the base weights (PiSSA, OLoRA)."""
        return self.init_lora_weights.startswith(BASE_CHANGING_INITS)


PII_KINDS = ("email", "phone", "ip", "key")


class CleanSpec(Strict):
    """Data cleaning (``alignkit data clean`` and a stage's ``data.clean``). Rules run in the
    order of the report: bad rows, filters, decontamination, exact then near duplicates; a row
    is counted under the first rule that removes it. The PII scrub masks text (it removes
    nothing); it is a regex scrub, not a guarantee that no personal data is left."""

    exact_dedup: bool = True
    """Drop a row whose text equals an earlier row's (after lower-casing and collapsing spaces)."""
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1)
    """Drop a row whose estimated Jaccard similarity (word shingles, MinHash LSH) to an earlier
    kept row is at least this; ``null`` turns near-duplicate removal off (it keeps an index that
    grows with the rows: about 2.7 KB per kept row)."""
    num_perm: int = Field(64, ge=16, le=512)
    """MinHash permutations: more estimate Jaccard more precisely, at more memory and time."""
    shingle_words: int = Field(3, ge=1)
    """Words per shingle for near duplicates."""
    decontaminate: list[str] = []
    """Eval/test sources (any file, Hub dataset or builtin; ``SOURCE@SPLIT``, default split
    ``test``) whose text must not appear in the training rows. In a stage, its held-out rows and
    ``heldout`` prompts are always included."""
    ngram: int = Field(8, ge=3)
    """Decontamination: a training turn sharing any ``ngram``-word sequence with an eval text is
    contaminated; an eval text shorter than this (3 words or more) counts when a training turn
    equals it."""
    length_unit: Literal["words", "tokens"] = "words"
    """Unit of ``min_length``/``max_length``; ``tokens`` uses the tokenizer (the stage's model,
    or ``--tokenizer`` on the command line)."""
    min_length: int | None = Field(None, ge=1)
    """Drop rows shorter than this (all turns together)."""
    max_length: int | None = Field(None, ge=1)
    """Drop rows longer than this (all turns together; for a pair, the prompt and the longer
    reply)."""
    empty_turns: bool = True
    """Drop rows with an empty or whitespace-only turn."""
    max_repeated_ngram_share: float | None = Field(0.5, ge=0, le=1)
    """Drop rows with a turn in which more than this share of its word n-grams repeat an earlier
    n-gram of the same turn (degenerate, looping text); ``null``: off."""
    repeated_ngram: int = Field(3, ge=1)
    """n of the repeated-n-gram filter."""
    non_text: bool = True
    """Drop rows holding control characters (besides tab and newlines), U+FFFD replacement
    characters, private-use or surrogate code points: binary junk or broken decoding."""
    identical_pairs: bool = True
    """Drop preference pairs whose chosen equals rejected (also after lower-casing and
    collapsing spaces)."""
    pii: list[Literal["email", "phone", "ip", "key"]] = list(PII_KINDS)
    """Mask these in every text: ``[EMAIL]``, ``[PHONE]``, ``[IP]``, ``[KEY]`` (API keys, tokens,
    private keys, ``password=...`` values). ``[]``: no scrub."""
    examples: int = Field(3, ge=0)
    """Examples per rule in the report."""

    @model_validator(mode="after")
    def _check(self) -> CleanSpec:
        if self.min_length and self.max_length and self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")
        return self


class DataSpec(Strict):
    source: str
    """JSONL/JSON/Parquet/CSV file, Hub dataset name, or ``builtin:NAME``."""
    split: str | None = "train"
    """Split of a Hub or builtin dataset (ignored for local files)."""
    eval_source: str | None = None
    """Held-out data; default: ``eval_split`` of the same source, else a slice of the train rows."""
    eval_split: str | None = None
    """Split of the same Hub or builtin source held out for evaluation."""
    eval_size: int | float = 0.05
    """Rows held out for evaluation when no eval source/split is given (int: rows; float: fraction)."""
    max_rows: int | None = None
    """Use at most this many training rows (after validation)."""
    max_eval_rows: int | None = 512
    """Use at most this many held-out rows (evaluation cost grows with them)."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """``error``: any bad row stops before training (exit 2). ``skip``: drop bad rows, report counts."""
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    """With ``skip``: fail when more than this fraction of rows is bad."""
    clean: CleanSpec | None = None
    """Clean the rows before training (``clean: {}`` for the defaults): duplicates, filters,
    decontamination against the held-out rows and prompts, PII scrub. The report goes to the
    stage's ``data_clean.json``."""
    stratify_by: str | None = None
    """When held-out rows are split off the training rows (``eval_size``): a row field
    (``source``, ``category``, ``language``) whose every value keeps its share in both sets."""
    group_by: str | None = None
    """When held-out rows are split off: ``prompt`` (or a row field such as ``conversation_id``)
    whose rows all land in the same set, so no prompt is in both."""

    @model_validator(mode="after")
    def _check_split(self) -> DataSpec:
        held_apart = self.eval_source is not None or self.eval_split is not None
        for key in ("stratify_by", "group_by"):
            if getattr(self, key) is not None and held_apart:
                raise ValueError(
                    f"{key} shapes the held-out rows split off the training rows (eval_size); "
                    "with eval_source/eval_split the held-out set is given. Set clean: {} to drop "
                    "training rows that overlap it"
                )
        return self


#: Sampling knobs, each defined once; every config that samples reuses them (and keeps its own
#: default: PPO samples 40 tokens, a comparison 128).
Samples = Annotated[int, Field(ge=1)]
"""Samples per prompt."""
Temperature = Annotated[float, Field(ge=0)]
"""Sampling temperature; 0 means greedy decoding."""
PolicyTemperature = Annotated[float, Field(gt=0)]
"""Sampling temperature where log-probs are divided by it (RL updates, KL): never 0."""
TopP = Annotated[float, Field(gt=0, le=1)]
"""Nucleus sampling; 1 keeps every token."""
MaxNewTokens = Annotated[int, Field(ge=1)]
"""New tokens per completion; one cut here ends with finish reason ``length``."""


class SamplingSpec(Strict):
    """How to sample: what every rollout engine is asked for (``engine.generate(prompts,
    spec)``). The defaults are the RL defaults: the model's own distribution. Configs that
    sample hold their knobs as fields of the types above and hand the engine one of these
    (:meth:`policy`)."""

    n: Samples = 1
    """Samples per prompt."""
    temperature: Temperature = 1.0
    """0 means greedy decoding."""
    top_p: TopP = 1.0
    """Nucleus sampling; 1 keeps every token."""
    top_k: int = Field(0, ge=0)
    """0 keeps every token. (HF ``generate`` would otherwise apply its default top-k of 50.)"""
    max_new_tokens: MaxNewTokens = 128
    """New tokens per completion; one cut here ends with finish reason ``length``."""
    stop: list[str] = []
    """Stop strings: the completion text ends before the first one."""
    stop_token_ids: list[int] = []
    """Extra stop tokens besides the tokenizer's EOS (kept in ``completion_ids``)."""
    seed: int | None = 0
    """Same seed, prompts and engine settings -> same samples. ``None``: not reproducible."""
    logprobs: bool = False
    """Record the log-prob of every sampled token under the distribution it was sampled from
    (after temperature, top-k and top-p; with greedy decoding, the model's own distribution)."""
    ignore_eos: bool = False
    """Keep generating past EOS up to ``max_new_tokens`` (benchmarks only)."""

    @model_validator(mode="after")
    def _check(self) -> SamplingSpec:
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def policy(
        cls, n: int, temperature: float, max_new_tokens: int, seed: int | None, top_p: float = 1.0
    ) -> SamplingSpec:
        """A policy's own distribution at ``temperature`` (top-k off; top-p off unless given):
        what RL rollouts, held-out evaluation, the health probe and comparisons sample."""
        return cls(
            n=n,
            temperature=temperature,
            top_k=0,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )


#: Samples per prompt where samples are compared (a comparison, a rollout job or stage): each
#: prompt gives a best-vs-worst pair and a mean over more than one sample.
COMPARE_SAMPLES = 4
#: The sampling defaults, for what shows them without holding a spec (the CLI's flags).
DEFAULT_SAMPLING = SamplingSpec()


class HeldoutSpec(Strict):
    """Held-out evaluation after a policy stage: sample the policy and its reference on the same
    prompts, score both, and estimate KL(policy || reference) from the policy's samples."""

    enabled: bool = True
    """Run the evaluation after training (it samples both models: minutes on a large model)."""
    prompts: str | None = None
    """Prompt source; default: ``builtin:prompts`` when the stage trains on builtin data, else off."""
    split: str | None = "test"
    """Split of a Hub or builtin prompt source."""
    num_prompts: int = Field(64, gt=0)
    """Evaluate on the first this many prompts."""
    samples_per_prompt: Samples = 2
    """Samples per prompt from each model."""
    max_new_tokens: MaxNewTokens = 40
    """New tokens per sample."""
    temperature: PolicyTemperature = 1.0
    """Sampling temperature of both models (top-k and top-p off: their own distributions)."""
    rewards: list[str] = []
    """Reward specs to score with (``gold``, a rule, ``module:function``, an RM stage dir);
    ``gold`` is added for builtin data. Recorded as ``reward``/``reward_ref`` (weighted sum)."""
    seed: int = 1234
    """Sampling seed: policy and reference sample with the same one, so runs compare."""

    @property
    def sampling(self) -> SamplingSpec:
        """What the policy and the reference each sample."""
        return SamplingSpec.policy(
            self.samples_per_prompt, self.temperature, self.max_new_tokens, self.seed
        )


class ForgettingSpec(Strict):
    """Forgetting, measured: NLL per token of general text under the policy a stage started from
    and under the one it trained (``forgetting_nll_before``/``_after``/``_increase`` in
    stage.json). Text no stage trains on, so a rise is what the stage cost the model elsewhere."""

    enabled: bool = True
    """Measure it after training (one forward pass over ``max_rows`` texts per model)."""
    source: str | None = None
    """Text rows (``{"text"}``; chat rows count as their messages' text): a file, a Hub dataset
    or ``builtin:NAME``. Default: ``builtin:pretraining`` on ``builtin:tiny`` (texts like those
    it was pretrained on, held out); WikiText-2 (``Salesforce/wikitext:wikitext-2-raw-v1``)
    elsewhere, skipped with a warning when it cannot be loaded (no network)."""
    split: str | None = "test"
    """Split of a Hub or builtin source."""
    max_rows: int = Field(256, gt=0)
    """Texts scored (the first this many non-empty ones)."""
    max_length: int = Field(256, gt=1)
    """Tokens per text; longer texts are cut."""


class ReplaySpec(Strict):
    """Replay against forgetting: earlier or general data mixed into a stage's training rows, so
    that every batch holds about ``fraction`` of them. SFT replays text or conversations (trained
    with the same loss as its own rows); DPO replays preference pairs."""

    source: str
    """A file, Hub dataset or ``builtin:NAME`` (``builtin:pretraining``: the text builtin:tiny
    was pretrained on), or ``stage:NAME``: the training data of an earlier stage of this run."""
    split: str | None = "train"
    """Split of a Hub or builtin source."""
    fraction: float = Field(gt=0, le=0.9)
    """Share of the training rows (so of every batch, on average) that are replay rows; rows
    are drawn from the source without replacement while it lasts, then again."""


class EarlyStoppingSpec(Strict):
    """Stop when the held-out metric stops improving; the best checkpoint is what the stage
    saves (transformers' ``EarlyStoppingCallback`` with ``load_best_model_at_end``)."""

    metric: str = "eval_loss"
    """A metric the trainer's evaluation reports (``eval_loss``, ``eval_accuracy`` (RM),
    ``eval_rewards/accuracies`` (DPO), ...); ``eval_`` is added when missing."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher is better; ``auto``: lower for names ending in ``loss``."""
    patience: int = Field(3, ge=1)
    """Evaluations in a row without an improvement of more than ``min_delta`` before stopping."""
    min_delta: float = Field(0.0, ge=0)
    """The smallest change that counts as an improvement for ``patience`` (the best checkpoint
    is the best value seen, whatever the margin)."""
    every: int = Field(50, gt=0)
    """Evaluate (and save a checkpoint) every this many steps."""

    #: Trainer options early stopping sets; given in ``train:`` as well they would disagree.
    OWNED: ClassVar[tuple[str, ...]] = (
        "eval_strategy", "eval_steps", "save_strategy", "save_steps", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better",
    )  # fmt: skip

    @property
    def eval_metric(self) -> str:
        return self.metric if self.metric.startswith("eval_") else f"eval_{self.metric}"

    @property
    def greater_is_better(self) -> bool:
        if self.mode == "auto":
            return not self.eval_metric.endswith("loss")
        return self.mode == "max"

    def trainer_args(self) -> dict[str, Any]:
        """The TRL/transformers config fields that run it: evaluate and save every ``every``
        steps, track ``metric``, and load the best checkpoint when training ends."""
        return {
            "eval_strategy": "steps",
            "eval_steps": self.every,
            "save_strategy": "steps",
            "save_steps": self.every,
            "load_best_model_at_end": True,
            "metric_for_best_model": self.eval_metric,
            "greater_is_better": self.greater_is_better,
        }


class LayerwiseLrSpec(Strict):
    """Learning rate by depth for full fine-tuning: the head (and final norm) at ``head``, each
    transformer block ``decay`` times the one above it, the embeddings at ``embeddings``."""

    head: float | None = Field(None, gt=0)
    """Learning rate of the top (final norm, LM or score head); default the trainer's."""
    decay: float = Field(0.9, gt=0, le=1)
    """Block i of L gets ``head * decay ** (L - i)``: the top block ``head * decay``."""
    embeddings: float | None = Field(None, gt=0)
    """Learning rate of the input (and tied output) embeddings; default
    ``head * decay ** (L + 1)``, one step below the lowest block."""


class TrainerOptions(BaseModel):
    """Optimizer options of every stage on a TRL trainer (mixed into their configs)."""

    model_config = ConfigDict(use_attribute_docstrings=True)  # as Strict's (a mixin: no Strict)

    layerwise_lr: LayerwiseLrSpec | None = None
    """Full fine-tuning only: learning rates by depth (see ``LayerwiseLrSpec``); LoRA has
    ``adapter.loraplus_ratio`` instead."""


class EvaluatedTrainerOptions(TrainerOptions):
    """Options of TRL stages that evaluate on held-out data (SFT, RM, DPO, SimPO/ORPO)."""

    early_stopping: EarlyStoppingSpec | None = None
    """Stop when ``metric`` stops improving; save the best checkpoint, not the last."""

    @model_validator(mode="after")
    def _early_stopping_owns_its_options(self):
        if self.early_stopping is None:
            return self
        for key in getattr(self, "train", {}):
            if key in EarlyStoppingSpec.OWNED:
                raise ValueError(
                    f"'train.{key}' is set by early_stopping (evaluation and checkpoints every "
                    "early_stopping.every steps); remove it from train"
                )
        return self


class StageBase(Strict):
    """Fields every stage has. A stage kind subclasses this with its own fields."""

    kind: str
    """The stage kind (``sft``, ``dpo``, ...): which schema and run function apply."""
    name: str
    """The stage's directory in the run and its name in ``from``, ``--set stages.NAME.x``."""
    from_: str | None = Field(None, alias="from")
    """Parent stage name (its output is this stage's starting point)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    #: Dotted path of the TRL config class the ``train:`` block passes through to (imported only
    #: when a config is validated, so the CLI starts fast).
    trainer_config: ClassVar[str | None] = None
    #: Whether this stage kind starts from the previous policy stage when ``from`` is not given.
    default_parent: ClassVar[bool] = False
    #: Whether this stage produces a policy (a later stage may start from it).
    is_policy: ClassVar[bool] = False
    #: Trainer options the stage sets from fields named otherwise (option -> field); an option
    #: named like one of the stage's fields is owned by that field without being listed. On a
    #: kind without a trainer, the usual TRL names of its fields (named in the refusal).
    owned_options: ClassVar[dict[str, str]] = {}

    train: dict[str, Any] = {}
    """Trainer knobs passed to the TRL config class; checked against its fields. A knob the
    stage has a field for (``beta``, ``max_length``, ...) is set by that field, never here."""

    @model_validator(mode="after")
    def _check_train_keys(self) -> StageBase:
        if not self.train:
            return self
        if type(self).trainer_config is None:
            raise ValueError(self._no_trainer_message())
        cls = trainer_config_class(type(self))
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in self.train:
            if key not in valid:
                raise ValueError(
                    f"unknown trainer option 'train.{key}' for {cls.__name__}{did_you_mean(key, valid)}"
                )
        for key, value in self.train.items():
            problem = _trainer_value_problem(cls, key, value)
            if problem:
                raise ValueError(f"train.{key}: {problem} (got {value!r})")
        for key, value in self.train.items():  # a valid knob, but the stage sets it
            owner = type(self).owned_options.get(key) or (
                key if key in type(self).model_fields and key != "train" else None
            )
            if owner == key:  # train.<key> would silently win over the typed field
                raise ValueError(
                    f"'train.{key}' is set by this stage's '{key}' (train.{key} duplicates the "
                    f"stage field); set {key}: {value!r} on the stage instead"
                )
            if owner is not None:
                raise ValueError(f"'train.{key}' is set by this stage's '{owner}'; set it there")
        return self

    def _no_trainer_message(self) -> str:
        """Why a ``train:`` block is refused on a stage kind without a TRL trainer, naming the
        stage's own field for each key where there is one."""
        own = [f for f in type(self).model_fields if f not in ("kind", "name", "from_", "train")]
        hints = []
        for key in self.train:
            field = type(self).owned_options.get(key) or (key if key in own else None)
            if field is not None:
                hints.append(f"train.{key} -> {field}")
            else:
                hints.append(f"train.{key}: no such setting{did_you_mean(key, own)}")
        return (
            f"a {self.kind} stage has no 'train:' block (no TRL trainer reads one; it would be "
            f"ignored): {'; '.join(hints)}. Set the stage's own fields: {', '.join(own)}"
        )

    def uses_stages(self) -> list[str]:
        """Names of other stages whose outputs this stage reads besides its parent (e.g. a reward
        model). A name that is a stage of the pipeline must come earlier; its hash is part of
        this stage's hash, so re-running it re-runs this stage."""
        return []

    @field_validator("name")
    @classmethod
    def _name_is_dirname(cls, v: str) -> str:
        if not _STAGE_NAME.fullmatch(v) or v.startswith("."):
            raise ValueError(
                "stage name must be a plain directory name: letters, digits, '_', '-', '.', at "
                "most 100 characters, not starting with '.'"
            )
        if v in RESERVED_NAMES:
            raise ValueError(
                f"{v!r} is taken by the run directory itself; choose another stage name"
            )
        return v


#: Ranges for the trainer knobs users set most; a value outside fails at load time, not mid-run.
_TRAIN_RANGES: dict[str, tuple[str, float]] = {
    "learning_rate": (">", 0),
    "per_device_train_batch_size": (">=", 1),
    "per_device_eval_batch_size": (">=", 1),
    "gradient_accumulation_steps": (">=", 1),
    "num_train_epochs": (">", 0),
    "max_length": (">=", 1),
    "max_prompt_length": (">=", 1),
    "max_completion_length": (">=", 1),
    "logging_steps": (">", 0),
    "save_steps": (">", 0),
    "eval_steps": (">", 0),
    "warmup_steps": (">=", 0),
    "weight_decay": (">=", 0),
    "max_grad_norm": (">=", 0),
    "num_generations": (">=", 2),
    "beta": (">=", 0),
}


def _trainer_value_problem(cls: type, key: str, value: Any) -> str | None:
    """Why ``value`` cannot be TRL config ``cls``'s field ``key``, or None: its type (from the
    dataclass annotation) and, for common knobs, its range. ``max_steps`` is -1 (epochs) or > 0."""
    try:
        hint = typing.get_type_hints(cls)[key]
    except Exception:  # noqa: BLE001 (an annotation we cannot resolve: leave it to TRL)
        hint = None
    if hint is not None:
        try:
            value = TypeAdapter(hint).validate_python(value)
        except ValidationError as e:
            return e.errors()[0]["msg"].removeprefix("Value error, ")
        except Exception:  # noqa: BLE001 (a type pydantic cannot build a validator for)
            pass
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if key == "max_steps" and not (value == -1 or value > 0):
        return "must be a positive number of steps (or -1: train num_train_epochs)"
    if key in _TRAIN_RANGES:
        op, bound = _TRAIN_RANGES[key]
        if (op == ">" and not value > bound) or (op == ">=" and not value >= bound):
            return f"must be {op} {bound:g}"
    return None


def trainer_config_class(stage_cls: type[StageBase]) -> type:
    module, _, name = stage_cls.trainer_config.rpartition(".")
    return getattr(importlib.import_module(module), name)


class PipelineConfig(Strict):
    run: RunSpec = RunSpec()
    model: ModelSpec = ModelSpec()
    adapter: AdapterSpec = AdapterSpec()
    stages: list[StageBase]
    sweep: dict[str, Any] | None = None
    """A hyperparameter search over one stage (:class:`alignkit.sweep.space.SweepSpec`), checked
    and run by ``alignkit sweep``; ``alignkit run`` runs the pipeline as written."""

    def stage(self, name: str) -> StageBase:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


StageKinds = Mapping[str, type[StageBase]]


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def load_pipeline(
    path: str | Path, stage_kinds: StageKinds, overrides: list[str] | None = None
) -> PipelineConfig:
    """Read, override and validate a pipeline YAML; raise :class:`UserError` on any problem."""
    return validate_pipeline(read_pipeline(path, overrides), stage_kinds, where=str(path))


def read_pipeline(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The raw pipeline config of a YAML file with ``--set`` overrides applied (not validated)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (run, model, adapter, stages)")
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def validate_pipeline(raw: dict, stage_kinds: StageKinds, where: str = "config") -> PipelineConfig:
    """The typed pipeline, or one UserError listing every problem found (each stage's and the
    top level's), so a config with several mistakes is fixed in one pass."""
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UserError(f"{where}: 'stages' must be a non-empty list of stages")
    stages: list[StageBase] = []
    problems: list[str] = []
    for i, s in enumerate(stages_raw):
        try:
            stages.append(_validate_stage(s, i, stage_kinds, where))
        except UserError as e:
            problems.append(str(e))
    try:
        cfg = PipelineConfig.model_validate({**raw, "stages": []})
    except ValidationError as e:
        problems.append(_format_errors(e, PipelineConfig, where))
    if problems:
        raise UserError("\n".join(problems))
    cfg.stages = stages
    _check_stage_graph(cfg, where)
    return cfg


def _validate_stage(s: Any, i: int, stage_kinds: StageKinds, where: str) -> StageBase:
    if not isinstance(s, dict):
        raise UserError(f"{where}: stages[{i}] must be a mapping with 'name' and 'kind'")
    kind = s.get("kind")
    if kind not in stage_kinds:
        raise UserError(
            f"{where}: stages[{i}].kind: unknown stage kind {kind!r}"
            f"{did_you_mean(str(kind), stage_kinds)}; known kinds: {', '.join(sorted(stage_kinds))}"
        )
    cls = stage_kinds[kind]
    s = {"name": kind, **s}
    try:
        return cls.model_validate(s)
    except ValidationError as e:
        raise UserError(_format_errors(e, cls, f"{where}: stages[{i}] ({s['name']})")) from None


def _check_stage_graph(cfg: PipelineConfig, where: str) -> None:
    seen: set[str] = set()
    for s in cfg.stages:
        if s.name in seen:
            raise UserError(f"{where}: two stages are named {s.name!r}; stage names must be unique")
        names = {x.name for x in cfg.stages}
        for used in s.uses_stages():
            if used in names and used not in seen:
                raise UserError(
                    f"{where}: stage {s.name!r} uses stage {used!r}, which must come before it"
                )
        if s.from_ is not None and s.from_ not in seen:
            hint = did_you_mean(s.from_, seen) if seen else ""
            raise UserError(
                f"{where}: stage {s.name!r} has from: {s.from_!r}, which is not an earlier stage"
                f"{hint}"
            )
        parent = parent_of(cfg, s)
        if type(s).is_policy and getattr(s, "adapter", None) is not None and parent is not None:
            raise UserError(
                f"{where}: stage {s.name!r} continues the adapter of {parent.name!r}, so its "
                "'adapter' block would be ignored; remove it (or start without a parent)"
            )
        seen.add(s.name)


def parent_of(cfg: PipelineConfig, stage: StageBase) -> StageBase | None:
    """The stage this one starts from: ``from`` if given, else the previous policy stage."""
    if stage.from_ is not None:
        return cfg.stage(stage.from_)
    if not type(stage).default_parent:
        return None
    idx = cfg.stages.index(stage)
    for prev in reversed(cfg.stages[:idx]):
        if type(prev).is_policy:
            return prev
    return None


# --- overrides ---------------------------------------------------------------------------------


def apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` to the raw config dict. ``stages.NAME.x`` addresses a stage by name
    (or index); the value is parsed as YAML (``1e-4``, ``true``, ``[q_proj, v_proj]``)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.sft.train.max_steps=50")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = read_yaml(text)
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _stage_in_list(node, part, item)
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = [] if part == "stages" and depth == 0 else {}
        if not isinstance(nxt, dict | list):
            raise UserError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
        node = nxt
    if isinstance(node, list):
        raise UserError(f"--set {item!r}: address a field inside a stage, e.g. stages.sft.kind")
    node[parts[-1]] = value


def _stage_in_list(stages: list, part: str, item: str) -> dict:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    names = [s.get("name", s.get("kind")) for s in stages if isinstance(s, dict)]
    for s, n in zip(stages, names, strict=False):
        if n == part:
            return s
    raise UserError(f"--set {item!r}: no stage named {part!r}{did_you_mean(part, names)}")


# --- hashing -----------------------------------------------------------------------------------


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (pydantic models are dumped by alias)."""
    blob = json.dumps(
        [
            p.model_dump(mode="json", by_alias=True) if isinstance(p, BaseModel) else p
            for p in parts
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- error messages ----------------------------------------------------------------------------


def did_you_mean(key: str, valid) -> str:
    """`` (did you mean X?)`` for the valid name nearest ``key``, or nothing when none is near."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_block(model: type[BaseModel], raw: dict, where: str):
    """One config block validated on its own (e.g. ``data clean --set``); UserError on problems."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_errors(e, model, where)) from None


def _format_errors(err: ValidationError, root: type[BaseModel], where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            valid = _fields_at(root, e["loc"][:-1])
            lines.append(f"{where}: unknown key '{loc}'{did_you_mean(key, valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys (aliases included) of the model reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", {})
    return [f.alias or name for name, f in fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
