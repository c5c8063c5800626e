"""``imagefm index``, ``imagefm search`` and ``imagefm serve``: image search and the HTTP server.

    imagefm index photos/ --model ckpt/ --out photos.index      # again later: incremental
    imagefm search photos.index "빨간 자동차" -k 10 --html results.html
    imagefm search photos.index --image query.jpg
    imagefm serve --model ckpt/ --index photos.index            # http://127.0.0.1:8000/
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _open_index(path: Path, model: Path | None, device: str, precision: str = "fp32") -> Any:
    from imagefm.apps.search import Index, SearchIndexError
    from imagefm.apps.search.store import StoreError

    try:
        return Index.open(path, model, device=device, precision=precision)
    except (SearchIndexError, StoreError) as err:
        _fail(str(err))


PRECISION_OPTION = typer.Option(
    "fp32", help="The model's forward passes: fp32, or bf16 (bfloat16 autocast: several times "
                 "faster where the hardware has bf16 arithmetic; embeddings within ~1e-4 "
                 "cosine of fp32).")


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index_command(
        folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
        out: Path = typer.Option(..., "--out", "-o", help="Index folder (created or updated)."),
        model: Path = typer.Option(None, "--model", "-m",
                                   help="Checkpoint; optional when updating an index."),
        kind: str = typer.Option(None, help="auto (default), flat, hnsw or ivfpq."),
        exact_threshold: int = typer.Option(
            None, help="auto: exact search below this many images, HNSW from it (100000)."),
        batch_size: int = typer.Option(64, help="Images per model batch (and per commit)."),
        workers: int = typer.Option(None, help="Decoding processes (default: up to 4; 0: "
                                               "decode in this process)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1..."),
        precision: str = PRECISION_OPTION,
        rebuild: bool = typer.Option(False, "--rebuild", help="Start the index from scratch."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Index a folder of images: embed new and changed files, drop deleted ones."""
        from imagefm.apps.search import Index, SearchIndexError, VectorIndexConfig
        from imagefm.apps.search.store import StoreError

        _log_warnings_briefly()
        config = None
        if exact_threshold is not None:
            config = VectorIndexConfig(exact_threshold=exact_threshold)
        try:
            index = Index.build(folder, out, model, config=config, kind=kind,
                                batch_size=batch_size, workers=workers, device=device,
                                progress=not quiet, rebuild=rebuild, precision=precision)
        except (SearchIndexError, StoreError, ValueError) as err:
            _fail(str(err))
        report = index.last_report
        typer.echo(f"{out}: {len(index)} images ({index.kind}); {report.summary()}")
        for message in report.errors[:5]:
            typer.echo(f"  skipped: {message}", err=True)
        if report.failed > 5:
            typer.echo(f"  ... and {report.failed - 5} more unreadable files", err=True)
        index.close()

    @app.command("search")
    def search_command(
        index_path: Path = typer.Argument(..., metavar="INDEX", help="Index folder."),
        query: str = typer.Argument(None, help="Text query (any language the model reads)."),
        image: Path = typer.Option(None, "--image", help="Search by an example image."),
        k: int = typer.Option(10, "-k", help="Number of results."),
        html: Path = typer.Option(None, "--html", help="Also write a thumbnail gallery here."),
        as_json: bool = typer.Option(False, "--json", help="Print results as JSON lines."),
        model: Path = typer.Option(None, "--model", "-m",
                                   help="The index's model, if it moved since indexing."),
        device: str = typer.Option("auto", help="auto, cpu, cuda..."),
    ) -> None:
        """Search an index by text or by image; prints rank, score and path."""
        if (query is None) == (image is None):
            _fail("give a text QUERY or --image PATH (one of them)")
        if k < 1:
            _fail("-k must be at least 1")
        index = _open_index(index_path, model, device)
        if image is not None:
            if not image.is_file():
                _fail(f"{image} not found")
            from imagefm.data.image import ImageDecodeError

            try:
                hits = index.search(image, k)
            except ImageDecodeError as err:
                _fail(str(err))
            title = f"images like {image.name}"
        else:
            hits = index.search(query, k)
            title = f"“{query}”"
        for rank, hit in enumerate(hits, start=1):
            if as_json:
                typer.echo(json.dumps({"rank": rank, "score": round(hit.score, 5),
                                       "path": hit.path, "file": str(hit.full_path)},
                                      ensure_ascii=False))
            else:
                typer.echo(f"{rank:3d}  {hit.score:.4f}  {hit.path}")
        if not hits:
            typer.echo("no results (is the index empty?)", err=True)
        if html is not None:
            from imagefm.apps.search.gallery import write_gallery

            write_gallery(hits, html, title=f"imagefm search: {title}")
            typer.echo(f"wrote {html}", err=True)
        index.close()

    @app.command("serve")
    def serve_command(
        model: Path = typer.Option(None, "--model", "-m",
                                   help="Checkpoint (default: the --index's model)."),
        index_path: Path = typer.Option(None, "--index", help="Index folder to search."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8000, help="Port."),
        api_key: str = typer.Option(None, envvar="IMAGEFM_API_KEY",
                                    help="Require 'Authorization: Bearer KEY' on /v1/* "
                                         "(or set IMAGEFM_API_KEY)."),
        max_batch: int = typer.Option(32, help="Dynamic batching: most requests per forward "
                                               "pass (1 turns batching off)."),
        max_wait_ms: float = typer.Option(5.0, help="Longest a request waits for company."),
        max_queue: int = typer.Option(1024, help="Queued inputs before answering 429."),
        timeout: float = typer.Option(30.0, help="Seconds a request may wait for the model."),
        chat_slots: int = typer.Option(8, help="Chat: replies decoded together, admitted and "
                                               "retired at every step (1: one at a time)."),
        max_chat_queue: int = typer.Option(32, help="Chat: requests decoding or waiting before "
                                                    "answering 429."),
        max_request_mb: float = typer.Option(16.0, help="Largest request body (MB)."),
        max_image_pixels: int = typer.Option(40_000_000, help="Largest image (pixels)."),
        image_url_host: list[str] = typer.Option(
            [], "--image-url-host", help="Chat: a host whose http(s) image URLs the server may "
                                         "fetch (repeat for several; '*' any host). Default: "
                                         "data: URLs only."),
        image_dir: Path = typer.Option(None, "--image-dir", help="Chat: a folder whose files "
                                                                 "image_url may name (file:// "
                                                                 "URLs or paths)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda..."),
        precision: str = PRECISION_OPTION,
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Serve the model over HTTP (embeddings, zero-shot, search) with a web page at /."""
        try:
            from imagefm.serve import ServeSettings, run_server
        except ImportError as err:
            _fail(f"{err}: pip install 'imagefm[serve]'")
        import imagefm
        from imagefm.apps.search.index import pick_device

        if model is None and index_path is None:
            _fail("give --model, --index or both")
        from imagefm.apps.zeroshot import check_precision

        check_precision(precision, pick_device(device))  # before the model loads
        index = (_open_index(index_path, model, device, precision) if index_path is not None
                 else None)
        if index is not None and model is None:
            loaded, name = index.model, Path(index.model_path).name
        else:
            loaded = index.model if index is not None else imagefm.load(model)
            name = model.resolve().name
            if index is None:
                loaded = loaded.to(pick_device(device)).eval()
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"warning: serving on {host} without an API key: anyone who can reach "
                       "this port can use the model and see the indexed images", err=True)
        settings = ServeSettings(
            host=host, port=port, api_key=api_key or None, model_name=name,
            max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
            timeout_s=timeout, max_request_bytes=int(max_request_mb * 2**20),
            chat_slots=chat_slots, max_chat_queue=max_chat_queue,
            max_image_pixels=max_image_pixels, precision=precision,
            image_url_hosts=tuple(image_url_host),
            image_dir=str(image_dir) if image_dir is not None else None)
        typer.echo(f"serving {name} on http://{host}:{port}/"
                   + (f" with {len(index)} indexed images" if index is not None else ""),
                   err=True)
        run_server(loaded, index=index, settings=settings, log_level=log_level)


def _log_warnings_briefly() -> None:
    # Unreadable files are logged by the indexer; show them as one plain line each.
    if not logging.getLogger().handlers and not os.environ.get("IMAGEFM_QUIET"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
