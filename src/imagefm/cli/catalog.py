"""``imagefm models``: the architectures imagefm loads, with example checkpoints (from
:mod:`imagefm.model_list`; ``docs/models.md`` is ``imagefm models --markdown``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        korean: bool = typer.Option(False, "--korean",
                                    help="Only checkpoints that cover Korean text."),
        markdown: bool = typer.Option(False, "--markdown",
                                      help="Markdown tables (what docs/models.md holds)."),
    ) -> None:
        """List the model families imagefm loads: example Hub ids, sizes, languages, licences,
        and the parity test that verifies each family."""
        from imagefm.model_list import families, render_markdown, render_text

        selected = families(korean=korean)
        typer.echo(render_markdown(selected) if markdown else render_text(selected), nl=False)
