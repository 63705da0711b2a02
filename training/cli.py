"""`pal` command line. Each command imports its implementation lazily, so `pal serve` never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="pal-rm: pluralistic (PAL) reward models")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory written by `pal train`")],
    out: Annotated[Path, typer.Argument(help="bundle directory to write")],
    fp16: Annotated[bool, typer.Option(help="also write an fp16 graph for GPU serving")] = False,
) -> None:
    """Export encoder + pooling + PAL head to a self-contained ONNX scorer bundle."""
    from models.export import export_bundle

    report = export_bundle(checkpoint, out, fp16=fp16)
    typer.echo(report.model_dump_json(indent=2) if hasattr(report, "model_dump_json") else str(report))


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="scorer bundle written by `pal export`")],
    host: Annotated[str | None, typer.Option(help="bind address (default PAL_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default PAL_PORT)")] = None,
) -> None:
    """Serve /score and /users/{id}/adapt over HTTP (no torch needed)."""
    from service.server import run_server

    run_server(bundle, host=host, port=port)


if __name__ == "__main__":
    app()
