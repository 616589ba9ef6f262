"""The ``alignkit`` command line.

This is the one core module that imports the other areas: it hands the stage registry to the
pipeline runner. Bad input (config, data, paths) prints one message and exits 2; internal
errors keep their traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from alignkit import interrupts, reference
from alignkit.config import (
    COMPARE_SAMPLES,
    DEFAULT_SAMPLING,
    CleanSpec,
    ModelSpec,
    apply_override,
    load_pipeline,
    parent_of,
    read_pipeline,
    read_yaml,
    validate_block,
    validate_pipeline,
)
from alignkit.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Alignment training: SFT, RM, DPO, PPO."
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and clean datasets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors unwrapped: greppable, paths whole

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Dotted override, e.g. stages.sft.train.max_steps=50"),
]


def _registry():
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.stages import REGISTRY

    return REGISTRY


def _load(config: Path, overrides: list[str] | None):
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.stages import stage_kinds

    return load_pipeline(config, stage_kinds(), overrides)


def _run(cfg, run_dir: Path | None) -> None:
    from alignkit.pipeline import run_pipeline  # the runner starts the accelerate state

    target = run_dir or Path(cfg.run.dir or f"runs/{cfg.run.name}")
    try:
        run_pipeline(cfg, _registry(), target, console)
    finally:  # a failed or interrupted run gets its page too: it shows where it stopped
        page = _write_run_page(target)
    console.print(f"run directory: [bold]{target}[/]  (alignkit status {target})")
    if page is not None:
        console.print(f"run page: [bold]{page}[/]  (one HTML file, open it in a browser)")
    for stage in cfg.stages:
        report = target / stage.name / "report.md"
        if stage.kind == "eval" and report.exists():
            console.print(f"report: [bold]{report}[/]  (plots and results.json beside it)")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML")],
    set_: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: run.dir or runs/<name>)")
    ] = None,
) -> None:
    """Run every stage of a pipeline YAML, skipping finished ones and resuming interrupted ones."""
    _run(_load(config, set_), run_dir)


def _write_run_page(run_dir: Path) -> Path | None:
    """The run's report.html, written by the main process at the end of ``alignkit run``. A
    page that cannot be written is a warning: the run's own outcome is what counts here."""
    from alignkit.eval.run_page import write_run_report  # an area: matplotlib, seconds

    main = os.environ.get("RANK", "0") == "0"  # torchrun and accelerate launch set RANK
    if not main or not (run_dir / "manifest.json").exists():
        return None
    try:
        return write_run_report(run_dir)
    except Exception as e:  # noqa: BLE001 (see the docstring)
        err_console.print(f"[yellow]warning[/] the run page was not written: {escape(str(e))}")
        return None


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="HTML file (default RUN_DIR/report.html)")
    ] = None,
) -> None:
    """Write one self-contained HTML page for a run: stage graph, curves, health, samples."""
    from alignkit.eval.run_page import write_run_report  # an area: matplotlib, seconds

    console.print(f"run page written to [bold]{write_run_report(run_dir, out)}[/]")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML with a sweep: block")],
    set_: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: run.dir or runs/<name>)")
    ] = None,
) -> None:
    """Search one stage's hyperparameters on Optuna: shared upstream stages, one run per trial,
    pruning, a resumable study; report with the best config, a table and plots."""
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.stages import stage_kinds
    from alignkit.sweep.study import run_sweep

    raw = read_pipeline(config, set_)
    run_sweep(raw, str(config), stage_kinds(), _registry(), run_dir, console)


@app.command()
def sft(
    config: Annotated[
        Path | None, typer.Argument(help="Pipeline YAML (its sft stages run)")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="SFT data: file, Hub dataset or builtin:sft")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Base model: Hub id, path or builtin:tiny")
    ] = "builtin:tiny",
    adapter: Annotated[str, typer.Option(help="lora | full | ia3 | prefix | prompt")] = "lora",
    quantization: Annotated[str, typer.Option(help="none | 4bit | 8bit")] = "none",
    run_dir: Annotated[Path | None, typer.Option(help="Run directory")] = None,
    set_: SetOpt = None,
) -> None:
    """Run SFT alone: from a config's sft stages, or from flags."""
    stage = {"name": "sft", "kind": "sft"}
    _single_stage("sft", config, data, model, adapter, quantization, stage, run_dir, set_)


def _single_stage(kind, config, data, model, adapter, quantization, stage, run_dir, overrides):
    """Run one stage kind from a config (with the stages it starts from) or from flags."""
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.stages import stage_kinds

    if config is not None:
        cfg = _load(config, overrides)
        needed: set[str] = set()
        for target in (s for s in cfg.stages if s.kind == kind):
            node = target
            while node is not None:  # the stage and every stage it starts from
                needed.add(node.name)
                node = parent_of(cfg, node)
        if not needed:
            raise UserError(f"{config}: no stage of kind {kind!r}")
        cfg.stages = [s for s in cfg.stages if s.name in needed]
    else:
        if data is None:
            raise UserError(f"alignkit {kind}: give a CONFIG or --data SOURCE")
        raw = {
            "run": {"name": kind},
            "model": {"name": model, "quantization": quantization},
            "adapter": {"type": adapter},
            "stages": [{**stage, "data": {"source": data}}],
        }
        for item in overrides or []:
            apply_override(raw, item)
        cfg = validate_pipeline(raw, stage_kinds(), where=f"alignkit {kind}")
    _run(cfg, run_dir)


@app.command()
def dpo(
    config: Annotated[
        Path | None, typer.Argument(help="Pipeline YAML (its dpo stages run)")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Preference data: file, Hub dataset, builtin")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Base model: Hub id, path or builtin:tiny")
    ] = "builtin:tiny",
    adapter: Annotated[str, typer.Option(help="lora | full")] = "lora",
    quantization: Annotated[str, typer.Option(help="none | 4bit | 8bit")] = "none",
    beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory")] = None,
    set_: SetOpt = None,
) -> None:
    """Run DPO alone: from a config (its stages up to and including DPO), or from flags."""
    stage = {"name": "dpo", "kind": "dpo", "beta": beta}
    _single_stage("dpo", config, data, model, adapter, quantization, stage, run_dir, set_)


@app.command()
def merge(
    stage: Annotated[Path, typer.Argument(help="A finished stage: RUN_DIR/STAGE")],
    out: Annotated[Path, typer.Option(help="Directory for the merged model")],
) -> None:
    """Merge a stage's adapter into its base and save a full model for serving."""
    from alignkit.models import merge_stage  # torch and transformers: seconds to import

    console.print(f"merged model written to [bold]{merge_stage(stage, out)}[/]")


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="Run directory")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest with each stage's metrics")
    ] = False,
    wide: Annotated[
        bool | None,
        typer.Option("--wide/--narrow", help="Every column (default: when the terminal has room)"),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Redraw every 2 s while the run's process is alive")
    ] = False,
) -> None:
    """Show a run's stages, their status, key metrics and health."""
    from alignkit import status as view  # each command imports only what it runs

    if as_json:
        print(json.dumps(view.load_status(run_dir), indent=2))
    elif watch:
        view.watch(run_dir, console, wide)
    else:
        view.show(run_dir, console, wide)


@data_app.command("check")
def data_check(
    source: Annotated[str, typer.Argument(help="File, Hub dataset name or builtin:NAME")],
    kind: Annotated[str, typer.Option(help="Dataset kind: sft, preference or prompts")] = "sft",
    split: Annotated[str | None, typer.Option(help="Split for Hub/builtin sources")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer (model id/path) for token lengths")
    ] = None,
) -> None:
    """Summarize a dataset (rows, formats, length percentiles) and list bad rows."""
    from alignkit.data import check as checks  # each command imports only what it runs

    check = {
        "sft": checks.check_sft,
        "preference": checks.check_preference,
        "prompts": checks.check_prompts,
    }.get(kind)
    if check is None:
        raise UserError(f"--kind {kind!r}: supported kinds: sft, preference, prompts")
    tok = None
    if tokenizer is not None:
        from alignkit.models import load_tokenizer, resolve_model_path  # transformers: seconds

        tok = load_tokenizer(resolve_model_path(ModelSpec(name=tokenizer)))
    report = check(source, split=split, tokenizer=tok)
    checks.print_report(report, console)
    if report.problems or report.refusal:
        raise typer.Exit(2)


@data_app.command("clean")
def data_clean(
    source: Annotated[str, typer.Argument(help="Input: file, Hub dataset name or builtin:NAME")],
    out: Annotated[Path, typer.Argument(help="Cleaned rows: .jsonl or .parquet (report beside)")],
    kind: Annotated[str, typer.Option(help="Dataset kind: sft, preference or prompts")] = "sft",
    against: Annotated[
        list[str] | None,
        typer.Option(help="Eval/test source whose text must not be in OUT (repeatable)"),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split for Hub/builtin sources")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer (model id/path) for length_unit=tokens")
    ] = None,
    max_bad_fraction: Annotated[
        float, typer.Option(help="Fail (writing nothing) past this share of unreadable rows")
    ] = 0.05,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Clean setting, e.g. near_dup_threshold=0.9, max_length=512"),
    ] = None,
) -> None:
    """Remove duplicates, near duplicates, eval-set overlap and broken rows; mask PII."""
    # each command imports only what it runs
    from alignkit.data.clean import clean_file
    from alignkit.data.clean_report import print_report, report_path

    raw: dict = {}
    for item in set_ or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. near_dup_threshold=0.9")
        raw[key.strip()] = read_yaml(text)
    raw["decontaminate"] = [*raw.get("decontaminate", []), *(against or [])]
    spec = validate_block(CleanSpec, raw, "data clean --set")
    tok = None
    if tokenizer is not None:
        from alignkit.models import load_tokenizer, resolve_model_path  # transformers: seconds

        tok = load_tokenizer(resolve_model_path(ModelSpec(name=tokenizer)))
    report = clean_file(
        source, out, kind, spec, split=split, tokenizer=tok, max_bad_fraction=max_bad_fraction
    )
    print_report(report, console)
    console.print(f"cleaned rows: [bold]{out}[/]  report: [bold]{report_path(out)}[/] (+ .md)")


@app.command()
def rollout(
    prompts: Annotated[str, typer.Option(help="Prompts: file, Hub dataset or builtin:prompts")],
    out: Annotated[Path, typer.Option(help="Output directory (re-run to resume)")],
    model: Annotated[str | None, typer.Option(help="Hub id, path or builtin:tiny")] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter dir on --model")] = None,
    stage: Annotated[str | None, typer.Option(help="A finished stage RUN_DIR/STAGE")] = None,
    n: Annotated[int, typer.Option(help="Samples per prompt")] = COMPARE_SAMPLES,
    engine: Annotated[str, typer.Option(help="hf | vllm")] = "hf",
    reward: Annotated[
        list[str] | None, typer.Option(help="gold, a rule, module:function or an RM dir; SPEC*W")
    ] = None,
    best_of_n: Annotated[bool, typer.Option(help="Also write DIR/preferences.jsonl")] = False,
    temperature: float = DEFAULT_SAMPLING.temperature,
    top_p: float = DEFAULT_SAMPLING.top_p,
    top_k: Annotated[int, typer.Option(help="0 = off")] = DEFAULT_SAMPLING.top_k,
    max_new_tokens: int = DEFAULT_SAMPLING.max_new_tokens,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    seed: int = DEFAULT_SAMPLING.seed,
    split: Annotated[str | None, typer.Option(help="Split of a Hub/builtin source")] = None,
    max_prompts: int | None = None,
    on_bad_rows: Annotated[str, typer.Option(help="error | skip")] = "error",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    quantization: Annotated[str | None, typer.Option(help="none | 4bit | 8bit")] = None,
    chunk_prompts: Annotated[int | None, typer.Option(help="Prompts per write")] = None,
    batch_size: Annotated[int, typer.Option(help="HF: sequences per forward")] = 64,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vLLM: share of the GPU it may take")
    ] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM: GPUs per engine")] = None,
) -> None:
    """Generate n completions per prompt, score them, write sharded JSONL (resumable)."""
    options = dict(locals())  # every flag above, before anything else is defined
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.rollouts.job import job_config, run_rollout_job

    run_rollout_job(job_config(**options), console)


@app.command()
def compare(
    config: Annotated[
        Path | None, typer.Argument(help="Compare YAML (configs/compare.yaml); flags override it")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base: Hub id, path, builtin:tiny or stage")
    ] = None,
    base_adapter: Annotated[str | None, typer.Option(help="PEFT adapter dir on --base")] = None,
    aligned: Annotated[
        list[str] | None, typer.Option(help="RUN_DIR/STAGE or model id/path (repeatable)")
    ] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompts: file, Hub dataset, builtin")] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(help="gold, a rule, module:function or an RM dir (repeatable)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output dir (samples cached there)")] = None,
    n: Annotated[
        int | None, typer.Option(help=f"Samples per prompt (default {COMPARE_SAMPLES})")
    ] = None,
    engine: Annotated[str | None, typer.Option(help="hf | vllm")] = None,
    head_to_head: Annotated[
        bool | None, typer.Option("--head-to-head", help="Also compare aligned models pairwise")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split of a Hub/builtin source")] = None,
    max_prompts: Annotated[int | None, typer.Option(help="First N prompts (default 256)")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help=f"Default {DEFAULT_SAMPLING.max_new_tokens}")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help=f"Default {DEFAULT_SAMPLING.temperature}")
    ] = None,
    seed: Annotated[int | None, typer.Option(help=f"Default {DEFAULT_SAMPLING.seed}")] = None,
) -> None:
    """Compare aligned models with their base: rewards, win rates with CIs, KL, a report."""
    options = dict(locals())
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.eval.compare import compare_config, run_compare

    options["rewards"] = options.pop("reward")
    run_compare(compare_config(options.pop("config"), **options), console)


@app.command("config-reference")
def config_reference() -> None:
    """Print every stage kind's fields and blocks as Markdown (docs/config-reference.md)."""
    # the areas load torch (seconds): only the commands that run them import them
    from alignkit.stages import stage_kinds

    print(reference.config_reference(stage_kinds()), end="")


def _quiet_libraries() -> None:
    """Keep the console to what a user acts on: our plan, progress bars, results."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _usage_errors() -> tuple[type, ...]:
    """Click's usage-error base: typer >= 0.20 vendors click (``typer.TyperException``); older
    typers raise click's own."""
    kinds: list[type] = [t for t in (getattr(typer, "TyperException", None),) if t]
    try:  # older typers only: newer ones vendor click, which may then be absent
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _abort_kinds() -> tuple[type, ...]:
    kinds: list[type] = [KeyboardInterrupt, typer.Abort]
    try:  # older typers only, as above
        import click

        kinds.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(kinds)


def main() -> None:
    _quiet_libraries()
    interrupts.install()  # SIGTERM like Ctrl-C, and never lost in a finalizer
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except _abort_kinds():
        interrupts.acknowledge()
        err_console.print("interrupted; re-run the same command to resume")
        sys.exit(130)
    except _usage_errors() as e:  # a mistyped command or option: usage, not a traceback
        e.show()
        sys.exit(getattr(e, "exit_code", 2) or 2)
