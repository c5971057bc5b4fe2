"""The ``lorakit`` command. Each command parses its arguments, loads the recipe and calls one function.

Exit status: 0 success; 2 a usage or recipe error, told in one line naming the file and key; 1 a
failure at run time, told plainly (``LORAKIT_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lorakit import train_flags
from lorakit.errors import Interrupted, UserError
from lorakit.serve import flags

app = typer.Typer(
    add_completion=True,  # --install-completion, --show-completion: bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning of Hugging Face transformers models from YAML recipes.",
)
score_app = typer.Typer(no_args_is_help=True, help="Score system outputs with a task's official metrics.")
app.add_typer(score_app, name="score")
console = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
]


def _run_dir_or_latest(run_dir: Path | None) -> Path:
    from lorakit.runs import RECIPE_FILE, latest_run_or_error

    if run_dir is not None:
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"not a lorakit run directory (no {RECIPE_FILE})", where=str(run_dir))
        return run_dir
    latest = latest_run_or_error()
    console.print(f"[dim]using the latest run: {latest}[/dim]")
    return latest


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    set_: SetOption = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", help="Where the run goes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    num_processes: train_flags.NumProcesses = None,
    num_machines: train_flags.NumMachines = None,
    machine_rank: train_flags.MachineRank = None,
    main_process_ip: train_flags.MainProcessIp = None,
    main_process_port: train_flags.MainProcessPort = None,
    rdzv_timeout: train_flags.RdzvTimeout = None,
) -> None:
    """Train a recipe; writes the adapter, metrics.json, curves.png and logs to the output directory."""
    from lorakit.recipe import load_recipe

    overrides = list(set_ or [])
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    overrides += train_flags.overrides(locals())  # --num-processes N: train.num_processes=N, ...
    loaded = load_recipe(recipe, overrides)
    from lorakit.training.launch import adopt_launcher_environment, launch, needs_launch

    if needs_launch(loaded):  # several processes: this one starts them and waits
        from lorakit.training.trackers import check_installed

        check_installed(loaded)  # one line here, not one from each process it would start
        argv = ["train", str(recipe), *(arg for o in overrides for arg in ("--set", o))]
        raise typer.Exit(launch(loaded, [*argv, "--resume"] if resume else argv, resume))
    from lorakit.training.loop import train as run_training

    adopt_launcher_environment(loaded)  # started by torchrun, srun or an operator: one of WORLD_SIZE
    result = run_training(loaded, resume=resume)
    if not result.main_process:
        return
    best = result.metrics["best"]
    console.print(
        f"[bold green]done[/bold green] {result.run_dir}  best {result.metrics['main_metric']} "
        f"{best[result.metrics['main_metric']]:.2f} at step {best['step']}"
    )


@app.command("eval")
def eval_(
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory; default: the latest run.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split to evaluate (default: dev).")] = None,
    set_: SetOption = None,
) -> None:
    """Evaluate a trained run; writes eval/metrics-*.json and predictions files and prints the metrics."""
    from lorakit.evaluation import evaluate_run

    metrics = evaluate_run(_run_dir_or_latest(run_dir), split, list(set_ or []))
    print(json.dumps(metrics, indent=2))


@app.command()
def merge(
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory; default: the latest run.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model.")] = ...,  # type: ignore[assignment]
) -> None:
    """Merge the adapter into the base weights (W0 + BA) and save a plain Hugging Face model."""
    from lorakit.merge import merge_run

    path = merge_run(_run_dir_or_latest(run_dir), out)
    console.print(f"merged model written to {path}")


@app.command()
def info(recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")], set_: SetOption = None) -> None:
    """Parameter counts, matched target modules and a training-memory estimate, from config.json alone."""
    from lorakit.info import describe, print_report
    from lorakit.recipe import load_recipe

    print_report(describe(load_recipe(recipe, list(set_ or []))), console)


@app.command("import-loralib")
def import_loralib(
    checkpoint: Annotated[Path, typer.Argument(help="A loralib .bin/.pt checkpoint (LoRA authors' format).")],
    recipe: Annotated[
        Path, typer.Option("--recipe", help="The recipe it was trained with (model, r, alpha).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the PEFT-format adapter.")],
) -> None:
    """Convert a loralib checkpoint into a PEFT-format adapter directory that eval and merge accept."""
    from lorakit.lora import import_loralib_checkpoint
    from lorakit.recipe import load_recipe, save_recipe

    loaded = load_recipe(recipe, [f"output_dir={out}"])
    if not checkpoint.is_file():
        raise UserError("checkpoint file not found", where=str(checkpoint))
    task_type = "CAUSAL_LM" if loaded.task.is_generation else "SEQ_CLS"
    try:
        import_loralib_checkpoint(checkpoint, out, loaded.lora.alpha, loaded.model.name_or_path, task_type)
    except (ValueError, RuntimeError) as exc:  # not a state dict, or a pickle that is not plain tensors
        raise UserError(f"cannot import: {' '.join(str(exc).split())[:300]}", where=str(checkpoint)) from None
    save_recipe(loaded, out / "recipe.yaml")
    console.print(f"adapter written to {out}")


@score_app.command("e2e")
def score_e2e(
    predictions: Annotated[Path, typer.Argument(help="One system output per line.")],
    references: Annotated[Path, typer.Argument(help="References grouped per MR, blank line between groups.")],
) -> None:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr as the official E2E scorer computes them, as JSON."""
    from lorakit.scoring.e2e import score_e2e_files

    for path in (predictions, references):
        if not path.is_file():
            raise UserError("file not found", where=str(path))
    print(json.dumps(score_e2e_files(predictions, references), indent=2))


@app.command()
def generate(
    model_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="RUN_DIR",
            help="A run directory or a merged model (lorakit merge); default: the latest run.",
        ),
    ] = None,
    input_: Annotated[
        str, typer.Option("--input", help="A text, or a file with one input per line ('-': standard input).")
    ] = ...,  # type: ignore[assignment]
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="For a merged model: the recipe giving its task and decoding."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="Prompt template: e2e, wikisql or none (default: the recipe's)."),
    ] = None,
    num_beams: Annotated[
        int | None, typer.Option("--num-beams", min=1, help="Beams (default: the recipe's).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Longest output, in tokens.")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (one beam).")] = False,
) -> None:
    """Generate with a trained adapter, unmerged or merged; prints one output per input line."""
    from lorakit.generate import generate as run_generation
    from lorakit.runs import latest_run_or_error

    if model_dir is None:
        model_dir = latest_run_or_error()
        # On stderr: stdout holds the outputs only, one a line.
        Console(stderr=True).print(f"[dim]using the latest run: {model_dir}[/dim]")
    outputs = run_generation(model_dir, input_, recipe, task, num_beams, max_new_tokens, greedy)
    for text in outputs:
        print(text)


@app.command()
def predict(
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter", help="NAME=RUN_DIR: a lorakit run or a PEFT adapter directory (repeatable)."
        ),
    ],
    input_: Annotated[
        str,
        typer.Option(
            "--input", help='JSON lines {"adapter": NAME, "text": ..., "text_pair": ...}; - for stdin.'
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", help="Where the JSON lines go (default: standard output).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per mixed batch.")] = 64,
    base: Annotated[
        str | None, typer.Option("--base", help="The base model (for PEFT directories without a recipe).")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=1, help="Truncate inputs here (default: each recipe's).")
    ] = None,
    quantize: flags.Quantize = None,
) -> None:
    """Predict rows with many adapters on one base model: one JSON line out per line in, in order."""
    from lorakit.predict import predict_file
    from lorakit.predict.runner import base_quantize

    with base_quantize(quantize):
        count = predict_file(adapter, input_, output, batch_size, base, max_length)
    if output is not None:
        Console(stderr=True).print(f"{count} rows predicted into {output}")


@app.command()
def serve(
    adapter: flags.Adapters,
    base: flags.Base = None,
    host: flags.Host = "127.0.0.1",
    port: flags.Port = 8000,
    max_batch_size: flags.MaxBatchSize = 64,
    max_wait_ms: flags.MaxWaitMs = 5.0,
    max_inputs: flags.MaxInputs = 1024,
    merged: flags.Merged = False,
    quantize: flags.Quantize = None,
    log_level: flags.LogLevel = "info",
    summary_every: flags.SummaryEvery = 60.0,
    api_key: flags.ApiKeys = None,
    admin_key: flags.AdminKeys = None,
    insecure: flags.Insecure = False,
    adapter_root: flags.AdapterRoot = None,
    max_adapters: flags.MaxAdapters = 64,
    max_body_bytes: flags.MaxBodyBytes = 2 * 1024 * 1024,
    max_input_chars: flags.MaxInputChars = 20_000,
    max_new_tokens: flags.MaxNewTokens = 256,
    max_queue_rows: flags.MaxQueueRows = 4096,
    request_timeout_s: flags.RequestTimeout = 30.0,
    max_connections: flags.MaxConnections = 256,
    public_metrics: flags.PublicMetrics = False,
) -> None:
    """Serve many adapters on one base model over HTTP (OpenAPI page at /docs) until SIGINT/SIGTERM."""
    given = {k: v for k, v in locals().items() if k not in ("adapter", "base")}  # the options, by name
    from lorakit.predict.runner import base_quantize
    from lorakit.serve import serve as run_server

    with base_quantize(quantize):
        run_server(adapter, base, flags.to_options(**given))


@app.command()
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or a PEFT adapter directory.")],
    compare: Annotated[
        Path | None, typer.Option("--compare", help="A second run: subspace similarity of the two lora_A.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for the report (default: RUN_DIR/analysis).")
    ] = None,
) -> None:
    """Study an adapter as the paper's section 7: ΔW's spectrum, ΔW against W0, subspace similarity.

    Writes analysis.json, analysis.md and PNG plots; --compare adds the φ(i, j) grid of the two runs.
    """
    from lorakit.analysis.analyze import analyze as run_analysis
    from lorakit.analysis.analyze import summary_lines

    result = run_analysis(run_dir, compare, out)
    for line in summary_lines(result.data):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"analysis written to {result.out}", soft_wrap=True)


@app.command()
def resize(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or a PEFT adapter directory.")],
    rank: Annotated[int | None, typer.Option("--rank", help="Keep the top K directions of each ΔW.")] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Keep, per module, the fewest directions holding this share of ‖ΔW‖²."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the new adapter (default: RUN_DIR-r{K} or RUN_DIR-e{E})."),
    ] = None,
) -> None:
    """Truncate each module's ΔW to its best rank-K approximation and write it as a new adapter.

    A PEFT-format adapter with the recipe beside it (eval, merge and PEFT load it); each module's relative
    Frobenius error is printed and saved in resize.json.
    """
    from lorakit.analysis.resize import resize as run_resize

    result = run_resize(run_dir, rank, energy, out)
    for name, rec in result.data["modules"].items():
        console.print(
            f"{name}: r {rec['rank_before']} -> {rec['rank']}, relative error {rec['relative_error']:.4g}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"resized adapter written to {result.out}", soft_wrap=True)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(metavar="SWEEP.yaml", help="A base recipe plus a grid.")],
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Points trained at once (subprocesses).")] = 1,
    rows: Annotated[str | None, typer.Option("--rows", help="Grid key down sweep.md's table.")] = None,
    cols: Annotated[str | None, typer.Option("--cols", help="Grid key across sweep.md's table.")] = None,
    output_dir: Annotated[
        str | None, typer.Option("--output-dir", help="The sweep's root (default: the file's output_dir).")
    ] = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the points and train nothing.")] = False,
    ray: train_flags.Ray = None,
    only: train_flags.Only = None,
) -> None:
    """Train every point of a grid over a recipe (finished points are reused, interrupted ones resumed);
    writes sweep.json, sweep.csv and sweep.md. Exit 1 when a point failed (the others still run)."""
    from lorakit.analysis.sweep import load_sweep, plan_lines
    from lorakit.analysis.sweep_run import run_sweep

    loaded = load_sweep(sweep_file, list(set_ or []), output_dir, rows, cols)
    if dry_run:
        for line in plan_lines(loaded):
            console.print(line, highlight=False, soft_wrap=True)
        return
    records = run_sweep(loaded, jobs, console, ray=ray, only=only)
    if any(r["status"] == "failed" for r in records):
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the Typer app and turns errors into one line and an exit status."""
    err = Console(stderr=True)
    # Library progress bars (weights loading, dataset mapping) would bury lorakit's own; errors stay.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers' load report ("classifier.weight MISSING": the fresh head lorakit asked for) is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        # Outside standalone mode Typer returns the exit status of an interrupted or exited command.
        args = train_flags.bare_ray(sys.argv[1:] if argv is None else list(argv))  # `sweep ... --ray`
        status = app(args=args, standalone_mode=False)
    except UserError as exc:
        err.print(f"[red]lorakit: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except Interrupted as exc:
        if str(exc):  # empty in the other processes of a multi-process run: the main one tells
            err.print(f"[yellow]lorakit:[/yellow] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_status
    except KeyboardInterrupt:
        err.print("lorakit: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place run-time failures become an exit status
        # Usage errors (Typer vendors click, so matched by shape): shown as click shows them, exit 2.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if os.environ.get("LORAKIT_DEBUG"):
            traceback.print_exc()
        message = escape(f"{type(exc).__name__}: {exc}")  # a message's [brackets] are not markup
        err.print(f"[red]lorakit: failed:[/red] {message}", highlight=False, soft_wrap=True)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
