"""`ochat viz ...`: embed conversations, project them to 3D, and write the interactive map."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ochat.errors import OchatError

app = typer.Typer(help="Conversation embeddings in an interactive 3D map (UMAP + K-Means + Plotly).",
                  no_args_is_help=True)

InFile = Annotated[Path, typer.Option("--in", help="PREFIX.*.text.jsonl from `ochat data`, or any conversation "
                                                   "JSONL / JSON list (canonical `items` or ShareGPT `conversations`)")]
EmbedderOpt = Annotated[str, typer.Option(help="local: all-MiniLM-L6-v2 on this machine (offline); "
                                               "openai: an OpenAI-compatible /v1/embeddings endpoint")]
BatchOpt = Annotated[Optional[int], typer.Option(help="texts per batch (default 64 local, 256 openai)")]
MaxTokensOpt = Annotated[int, typer.Option(help="local embedder: tokens kept per conversation (model limit 256)")]
ApiBaseOpt = Annotated[Optional[str], typer.Option(help="openai: base URL, e.g. http://localhost:8000/v1 "
                                                        "(default: OPENAI_BASE_URL or api.openai.com)")]
ModelOpt = Annotated[Optional[str], typer.Option(help="openai: embedding model name (default text-embedding-3-small)")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(help="openai: API key (default: OPENAI_API_KEY)")]
RetriesOpt = Annotated[int, typer.Option(help="openai: retries of a failed request (exponential backoff)")]
NeighborsOpt = Annotated[int, typer.Option(help="UMAP neighbourhood size (clipped to the number of points - 1)")]
MinDistOpt = Annotated[float, typer.Option(help="UMAP minimum distance between points")]
ClustersOpt = Annotated[int, typer.Option(help="K-Means clusters (colours)")]
SeedOpt = Annotated[int, typer.Option(help="random seed for UMAP and K-Means (-1: none, faster on many cores)")]


def _embed(records, embedder, batch_size, max_tokens, api_base, model, api_key, retries):
    from ochat.visualization.embed import embed_texts

    if embedder not in ("local", "openai"):
        raise OchatError(f"--embedder: expected 'local' or 'openai', got {embedder!r}")
    return embed_texts([r.embedding_text for r in records], embedder, batch_size, max_tokens, model, api_base, api_key,
                       max_retries=retries)


@app.command()
def embed(in_file: InFile, out: Annotated[Path, typer.Option(help="output .npy (float32, one row per conversation)")],
          embedder: EmbedderOpt = "local", batch_size: BatchOpt = None, max_tokens: MaxTokensOpt = 128,
          api_base: ApiBaseOpt = None, model: ModelOpt = None, api_key: ApiKeyOpt = None,
          retries: RetriesOpt = 6) -> None:
    """Embed each conversation into a vector."""
    from ochat.visualization.embed import save_embeddings
    from ochat.visualization.texts import read_records

    records = read_records(in_file)
    emb = _embed(records, embedder, batch_size, max_tokens, api_base, model, api_key, retries)
    save_embeddings(out, emb)
    typer.echo(f"wrote {out}: {emb.shape[0]} embeddings of dimension {emb.shape[1]} ({embedder})")


@app.command()
def project(emb: Annotated[Path, typer.Option("--emb", help=".npy from `ochat viz embed`")],
            texts: Annotated[Path, typer.Option("--texts", help="the file that was embedded")],
            out: Annotated[Path, typer.Option(help="NAME.visualizer.json")],
            n_neighbors: NeighborsOpt = 500, min_dist: MinDistOpt = 0.1, n_clusters: ClustersOpt = 20,
            seed: SeedOpt = 0) -> None:
    """UMAP the embeddings to 3D and colour them with K-Means: a visualizer JSON."""
    from ochat.visualization.embed import load_embeddings
    from ochat.visualization.project import project as run_project, write_visualizer_json
    from ochat.visualization.texts import read_records

    records = read_records(texts)
    data = run_project(records, load_embeddings(emb), n_neighbors, min_dist, n_clusters,
                       None if seed < 0 else seed, where=str(emb))
    write_visualizer_json(out, data)
    typer.echo(f"wrote {out}: {len(records)} points in {len(data['cluster_sizes'])} clusters")


@app.command()
def html(in_file: Annotated[Path, typer.Option("--in", help="NAME.visualizer.json (ochat's or OpenChat's)")],
         out: Annotated[Path, typer.Option(help="output .html (self-contained, works offline)")]) -> None:
    """Write the interactive map: one self-contained HTML page."""
    from ochat.visualization.html import read_visualizer_json, visualizer_name, write_html

    data = read_visualizer_json(in_file)
    write_html(out, data, visualizer_name(in_file))
    typer.echo(f"wrote {out}: {len(data['text'])} points ({out.stat().st_size / 1e6:.1f} MB)")


@app.command("map")
def map_(in_file: InFile, out: Annotated[Path, typer.Option(help="output directory")],
         embedder: EmbedderOpt = "local", batch_size: BatchOpt = None, max_tokens: MaxTokensOpt = 128,
         api_base: ApiBaseOpt = None, model: ModelOpt = None, api_key: ApiKeyOpt = None, retries: RetriesOpt = 6,
         n_neighbors: NeighborsOpt = 500, min_dist: MinDistOpt = 0.1, n_clusters: ClustersOpt = 20,
         seed: SeedOpt = 0) -> None:
    """embed + project + html in one go: DIR/NAME.visualizer.json and DIR/NAME.html."""
    from ochat.visualization.embed import save_embeddings
    from ochat.visualization.html import visualizer_name, write_html
    from ochat.visualization.project import project as run_project, write_visualizer_json
    from ochat.visualization.texts import read_records

    t0 = time.perf_counter()
    records = read_records(in_file)
    if out.exists() and not out.is_dir():
        raise OchatError(f"--out {out}: exists and is not a directory")
    name = visualizer_name(in_file)
    typer.echo(f"[1/3] embedding {len(records)} conversations ({embedder})", err=True)
    emb = _embed(records, embedder, batch_size, max_tokens, api_base, model, api_key, retries)
    out.mkdir(parents=True, exist_ok=True)
    save_embeddings(out / f"{name}.embeddings.npy", emb)
    t1 = time.perf_counter()
    typer.echo(f"[2/3] projecting to 3D (UMAP, n_neighbors={n_neighbors}) and clustering (K-Means, k={n_clusters})", err=True)
    data = run_project(records, emb, n_neighbors, min_dist, n_clusters, None if seed < 0 else seed)
    write_visualizer_json(out / f"{name}.visualizer.json", data)
    t2 = time.perf_counter()
    typer.echo("[3/3] writing the page", err=True)
    write_html(out / f"{name}.html", data, name)
    t3 = time.perf_counter()
    typer.echo(f"wrote {out / (name + '.visualizer.json')}, {out / (name + '.html')} and {out / (name + '.embeddings.npy')}: "
               f"{len(records)} conversations, {len(data['cluster_sizes'])} clusters "
               f"(embed {t1 - t0:.0f}s, project {t2 - t1:.0f}s, page {t3 - t2:.0f}s)")
