"""The ``fusechat`` command: one subcommand per stage, each taking the run config.

Commands only parse arguments and call one importable function. Each command imports
what it calls inside its own body, on purpose: the pipeline pulls in torch,
transformers and mergekit, and ``fusechat --help`` must answer at once.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fusechat import __version__
from fusechat.config import eval_settings
from fusechat.errors import DiskError, FusechatError, disk_errno
from fusechat.progress import console
from fusechat.stages import STAGES, StageOption, stage

app = typer.Typer(
    name="fusechat",
    help="Fuse chat LLMs of different architectures and tokenizers into one model (FuseChat).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config field: key.sub=value (repeatable).", show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its output is complete.")]


def _load(config: Path, overrides: list[str] | None):
    """A valid config whose files, folders and model packages are all there."""
    from fusechat.pipeline import load_run

    return load_run(config, overrides or [])


def _stage(name: str, cfg, force: bool = False, **options) -> None:
    from fusechat.pipeline import run_stages

    run_stages([name], cfg, force=force, **options)


def _option_annotation(option: StageOption):
    kind = option.type if option.default is not None else Optional[option.type]
    return Annotated[kind, typer.Option(help=option.help)]


def _stage_command(name: str, doc: str, option: StageOption | None):
    """A typer command for the stage ``name``: the config, --set, --force and its own option, if any."""
    def command(config, set_=None, force=False, **own):
        _stage(name, _load(config, set_), force, **own)

    P = inspect.Parameter
    params = [P("config", P.POSITIONAL_OR_KEYWORD, annotation=ConfigArg),
              P("set_", P.POSITIONAL_OR_KEYWORD, default=None, annotation=SetOpt),
              P("force", P.POSITIONAL_OR_KEYWORD, default=False, annotation=ForceOpt)]
    if option:
        params.append(P(option.name, P.KEYWORD_ONLY, default=option.default, annotation=_option_annotation(option)))
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


for _stage_record in STAGES:
    if not _stage_record.own_command:
        app.command(_stage_record.name)(_stage_command(_stage_record.name, _stage_record.help, _stage_record.option))


@app.command("eval", help=stage("eval").help)
def eval_(
    config: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="CONFIG", help="Run config (YAML); leave out with --models.", show_default=False),
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    models: Annotated[
        Optional[list[str]],
        typer.Option("--models", help="Evaluate these model folders (hub:org/name for a hub id) instead of a run (repeatable or "
                                      "space-separated); rows are named after the folders.", show_default=False),
    ] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluation items (JSONL), with --models.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder, with --models (default: fusechat-eval).",
                                                show_default=False)] = None,
    benchmark: Annotated[
        str | None,
        typer.Option("--benchmark", help="Run only this benchmark: items (eval.data or --data), mt-bench "
                                         "(docs/mt-bench.md) or humaneval (docs/humaneval.md).", show_default=False),
    ] = None,
    allow_code_execution: Annotated[
        bool,
        typer.Option("--allow-code-execution", help="Let HumanEval run the models' code, each program alone in a "
                                                    "sandbox (docs/code-execution.md).", show_default=False),
    ] = False,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="MT-Bench judge: a local chat model folder or hub:org/name; with --judge-endpoint, "
                                     "the model name sent to the endpoint (default gpt-4).", show_default=False),
    ] = None,
    judge_endpoint: Annotated[
        str | None,
        typer.Option("--judge-endpoint", help="MT-Bench judge through an OpenAI-compatible API: base URL (…/v1); "
                                              "the key comes from $OPENAI_API_KEY.", show_default=False),
    ] = None,
) -> None:
    from fusechat.evaluate.stage import evaluate_folders

    positional = config or []
    if not models:
        if len(positional) != 1 or data is not None or out is not None:
            raise FusechatError(_EVAL_USAGE)
        cfg = _load(Path(positional[0]), set_)
        _set_judge(cfg.eval, judge, judge_endpoint, benchmark)
        cfg.eval.humaneval.allow_code_execution |= allow_code_execution
        _stage("eval", cfg, force, benchmark=benchmark)
        return
    # Click gives an option one value: the other folders of `--models A B` arrive as positionals.
    configs = [p for p in positional if p.endswith((".yaml", ".yml"))]
    if configs:
        raise FusechatError(f"give either a run CONFIG ({configs[0]}) or --models, not both")
    settings = eval_settings(set_ or [])
    _set_judge(settings, judge, judge_endpoint, benchmark)
    settings.humaneval.allow_code_execution |= allow_code_execution
    evaluate_folders([*models, *positional], out or Path("fusechat-eval"), settings, data, benchmark, force)


def _set_judge(settings, judge: str | None, endpoint: str | None, benchmark: str | None) -> None:
    """Put --judge and --judge-endpoint into the eval settings; they only go with MT-Bench."""
    if judge is None and endpoint is None:
        return
    if benchmark not in (None, "mt-bench") or (benchmark is None and "mt-bench" not in settings.benchmarks):
        raise FusechatError("--judge and --judge-endpoint go with MT-Bench: add --benchmark mt-bench "
                            "(or list mt-bench in eval.benchmarks)")
    if judge is not None:
        settings.mt_bench.judge = judge
    if endpoint is not None:
        settings.mt_bench.judge_endpoint = endpoint


_EVAL_USAGE = (
    "give exactly one of: a run CONFIG (`fusechat eval run.yaml`), or model folders with their items "
    "(`fusechat eval --models A B --data items.jsonl [--out DIR]`) or with MT-Bench "
    "(`fusechat eval --models A B --benchmark mt-bench|humaneval [--out DIR]`); --data and --out go with --models"
)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Run every stage in order, skipping those whose output is complete."""
    from fusechat.pipeline import run_all

    run_all(_load(config, set_), force=force)


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a run config, print it with every default filled in, and say what a run still needs."""
    from fusechat.pipeline import validate_run

    validate_run(config, set_ or [])


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo run.")] = Path("fusechat-demo"),
    zoo: Annotated[str, typer.Option(help="demo (the shipped zoo) or micro (the pipeline in about a minute).")] = "demo",
    set_: SetOpt = None,
    force: ForceOpt = False,
    verbose: Annotated[bool, typer.Option(help="Show every stage's output instead of one line per stage "
                                               "(which otherwise goes to OUT/demo.log).")] = False,
) -> None:
    """Fuse a zoo of tiny chat models end to end and print the results table (no GPU or hub needed)."""
    from fusechat.demo import run_demo

    run_demo(out, force=force, zoo=zoo, overrides=set_, verbose=verbose)


zoo_app = typer.Typer(help="The tiny chat models the demo fuses.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path, typer.Option(help="Folder of the zoo.")] = Path("fusechat-demo/zoo"),
    seed: Annotated[int, typer.Option(min=0, help="Seed of the models' initialisation and training data "
                                                  "(another build of the same zoo).")] = 0,
    force: ForceOpt = False,
) -> None:
    """Build (or reuse) the demo's zoo: a pivot and three specialists, trained here."""
    from fusechat.zoo.build import build_zoo
    from fusechat.zoo.catalog import DEMO_ZOO, seeded

    for name, folder in build_zoo(out, seeded(DEMO_ZOO, seed), force=force).items():
        typer.echo(f"{name}\t{folder}")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Model folder, or hub:org/name for a Hugging Face hub id.")],
    message: Annotated[
        Optional[str], typer.Option(help="Answer this one message, print the answer and exit.", show_default=False)
    ] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampling.")] = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda; auto: a GPU if there is one.")] = "auto",
    dtype: Annotated[
        Optional[str], typer.Option(help="fp32, bf16 or fp16; default: bf16 on GPU, fp32 on CPU.", show_default=False)
    ] = None,
) -> None:
    """Talk with a model through its chat template (/reset clears the conversation, /exit ends it)."""
    from fusechat.chat import chat as run_chat

    run_chat(model, message, device=device, dtype=dtype, system=system, max_new_tokens=max_new_tokens,
             temperature=temperature)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusechat {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    pass


def _close_distributed() -> None:
    """Leave the process group cleanly, or `accelerate launch` / torchrun report an abort."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print as one clear message, never as a traceback."""
    from rich.markup import escape


    try:
        app(args=argv, standalone_mode=False)
        sys.exit(0)
    except FusechatError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        console.print("interrupted; complete work is kept, rerun the same command to go on")
        sys.exit(130)
    except OSError as e:
        if disk_errno(e) is None:
            raise
        where = Path(e.filename).parent if e.filename else Path.cwd()
        console.print(f"[red]error:[/red] {escape(str(DiskError(where, e)))}", soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
    finally:
        _close_distributed()
