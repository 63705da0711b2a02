"""`pal` command line. Each command imports its implementation lazily, so `pal serve` never imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from models.config import DEFAULT_ENCODER
from service.cli import serve

if TYPE_CHECKING:
    from training.pipeline import RunOptions

ENCODER_HELP = (
    f"HF id or local path of the frozen encoder (default: the preset's, all-mpnet-base-v2 for polis*, else "
    f"{DEFAULT_ENCODER}; {DEFAULT_ENCODER} for --data)"
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="pal-rm: pluralistic (PAL) reward models")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory written by `pal train`")],
    out: Annotated[Path, typer.Argument(help="bundle directory to write")],
    fp16: Annotated[bool, typer.Option(help="also write an fp16 graph for GPU serving")] = False,
    external_data_mb: Annotated[
        float | None,
        typer.Option(help="decoder weights above this many MB go to a .data file beside the graph (default ~1800)"),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            help="comparisons to keep a sample of (<=256) for choosing the served precision: a splits directory "
            "(its seen_val.jsonl) or a JSONL file; default: the checkpoint's own validation sample"
        ),
    ] = None,
) -> None:
    """Export encoder + pooling + PAL head to a self-contained ONNX scorer bundle."""
    from models.checkpoint import CheckpointError
    from models.export import ExportError, export_bundle

    limit = None if external_data_mb is None else int(external_data_mb * 1e6)
    try:
        report = export_bundle(checkpoint, out, fp16=fp16, external_data_bytes=limit, validation=validation)
    except (ExportError, CheckpointError) as e:
        typer.echo(f"export failed: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(report.model_dump_json(indent=2))


# `pal serve` is the service's own command (service/cli.py, also installed as `pal-serve`): the scorer images
# carry no training/ code.
app.command()(serve)


def _shots(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@app.command("build-data")
def build_data(
    preset: Annotated[str, typer.Option(help="simulated | persona | polis")] = "persona",
    out: Annotated[Path, typer.Option(help="directory for the JSONL splits")] = Path("runs/data"),
    seed: Annotated[int, typer.Option(help="builder seed")] = 0,
) -> None:
    """Build a preset's seen/unseen comparison splits and write them as JSONL."""
    from training.pipeline import build_data as run
    from training.pipeline import dumps

    typer.echo(dumps(run(preset, out, seed)))


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="simulated | persona | polis (first conversation)")] = "persona",
    out: Annotated[Path, typer.Option(help="checkpoint directory to write")] = Path("runs/checkpoint"),
    k: Annotated[int, typer.Option(help="number of prototypes K")] = 3,
    seed: Annotated[int, typer.Option(help="data and training seed")] = 0,
    encoder: Annotated[str | None, typer.Option(help=ENCODER_HELP)] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="your preference file (.jsonl/.csv/.parquet: prompt, chosen, rejected + a user column), or a "
            "splits directory from `pal build-data`; overrides --preset"
        ),
    ] = None,
    user_column: Annotated[str, typer.Option(help="--data FILE: the column naming the user")] = "user_id",
    pooling: Annotated[
        str | None, typer.Option(help="mean | cls | last (default: last for decoder-only models, else mean)")
    ] = None,
    stream: Annotated[
        bool,
        typer.Option(
            help="--data FILE: stream it through an on-disk cache (ONNX embedding in shards, resumable; the head "
            "trains from memory-mapped rows): memory does not grow with the file. Same splits as without."
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="--stream: the cache directory (default: under $PAL_CACHE_DIR/stream)")
    ] = None,
    provider: Annotated[str, typer.Option(help="--stream: embedding provider, auto | cuda | cpu")] = "auto",
) -> None:
    """Train one PAL model on a preset, your preference file, or JSONL splits, and save a checkpoint."""
    from training.pipeline import RunOptions, dumps, train_one

    if stream and (data is None or not data.is_file()):
        typer.echo("train failed: --stream needs --data FILE (a .jsonl, .csv or .parquet file)", err=True)
        raise typer.Exit(1)
    if data is not None and data.is_file():
        kw = {"stream": True, "cache_dir": cache_dir, "provider": provider} if stream else {}
        typer.echo(dumps(_file_command("train", data, out, RunOptions(k, seed, encoder), user_column, pooling, **kw)))
        return
    typer.echo(dumps(train_one(preset, out, RunOptions(k, seed, encoder), data)))


def _file_command(
    what: str, data: Path, out: Path, run: RunOptions, user_column: str, pooling: str | None, **kw: object
) -> dict:
    """train/eval on a user's preference file; a bad file is one clear error listing its bad rows, no traceback."""
    from training.data.userfile import PreferenceFileError
    from training.pipeline import evaluate_file, train_file

    try:
        if what == "train":
            return train_file(data, out, run, user_column, pooling, **kw)
        return evaluate_file(data, out, run, user_column, pooling)
    except PreferenceFileError as e:
        typer.echo(f"{what} failed: {e}", err=True)
        raise typer.Exit(1) from e


@app.command("eval")
def evaluate(
    preset: Annotated[str, typer.Option(help="simulated | persona | polis[-pairs][-joint]")] = "persona",
    out: Annotated[Path, typer.Option(help="directory for checkpoints, report.json and fewshot.png")] = Path(
        "runs/eval"
    ),
    k: Annotated[int, typer.Option(help="the chosen K, evaluated beside the K=1 baseline")] = 3,
    seed: Annotated[int, typer.Option(help="data and training seed")] = 0,
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds, e.g. 0,1,2: per-seed runs + mean and 95% interval")
    ] = None,
    shots: Annotated[str, typer.Option(help="comma-separated shot counts")] = "1,2,5,10,20,50",
    prior_strength: Annotated[
        float | None, typer.Option(help="few-shot prior strength (default: picked on seen users' val pairs)")
    ] = None,
    encoder: Annotated[str | None, typer.Option(help=ENCODER_HELP)] = None,
    data: Annotated[
        Path | None, typer.Option(help="your preference file (.jsonl/.csv/.parquet); overrides --preset")
    ] = None,
    user_column: Annotated[str, typer.Option(help="--data FILE: the column naming the user")] = "user_id",
    pooling: Annotated[str | None, typer.Option(help="mean | cls | last (default: by architecture)")] = None,
) -> None:
    """Seen-user accuracy on held-out pairs and unseen-user accuracy vs shots, for K=1 and K."""
    from training.pipeline import RunOptions, dumps, evaluate_preset

    run = RunOptions(k, seed, encoder, _shots(shots), prior_strength)
    if data is not None:
        typer.echo(dumps(_file_command("eval", data, out, run, user_column, pooling)))
        return
    typer.echo(dumps(evaluate_preset(preset, out, run, _shots(seeds) if seeds else None)))


data_app = typer.Typer(no_args_is_help=True, help="the public data sets the presets read")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    which: Annotated[str, typer.Argument(help="persona | polis | all")] = "all",
    dest: Annotated[
        Path | None, typer.Option(help="folder to write (default: $PAL_DATA_DIR, else the user cache)")
    ] = None,
) -> None:
    """Download the data from upstream at pinned commits, verifying every file's sha256."""
    import json

    from training.data.fetch import FetchError, fetch
    from training.data.paths import data_dir

    try:
        summary = fetch(which, dest)
    except FetchError as e:  # offline, refused hash: one line, no traceback
        typer.echo(f"data fetch failed: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps({**summary, "readers_use": str(data_dir())}, indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="checkpoint, bundle, Redis data and report go here")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="data and training seed")] = 0,
) -> None:
    """The main job end to end: train a small checkpoint, export, serve, adapt an unseen user, score."""
    from training.data.fetch import FetchError
    from training.demo import run_demo

    try:
        run_demo(out, seed=seed)
    except FetchError as e:  # no data and no network: one line naming the command, no traceback
        typer.echo(f"demo failed: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def population(
    url: Annotated[str, typer.Argument(help="a running pal-rm server, e.g. http://127.0.0.1:8000")],
    plot: Annotated[Path | None, typer.Option(help="write users' weights on the simplex as a PNG")] = None,
    sample: Annotated[int, typer.Option(help="users' weights to fetch for the plot")] = 5000,
    refresh: Annotated[bool, typer.Option(help="re-read every user instead of the server's cached snapshot")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="PAL_API_KEY", help="bearer token")] = None,
) -> None:
    """How users spread on the simplex (GET /population): counts per group, mean and spread of weights."""
    from training.population import fetch
    from training.population import plot as draw

    view = fetch(url, sample if plot else 0, api_key, refresh)
    if plot is not None:
        draw(view, plot)
    view.pop("weights", None)
    view.pop("labels", None)
    typer.echo(json.dumps(view, indent=2) + (f"\nplot: {plot}" if plot else ""))


if __name__ == "__main__":
    app()
