"""Run the course notebooks and write them, with their outputs, as static HTML pages for reading without a kernel.

    python3 scripts/render_notebooks.py            # full settings -> site/index.html + one page per notebook
    python3 scripts/render_notebooks.py --fast     # INVVIZ_FAST=1: few steps, small images (a quick check)
    python3 scripts/render_notebooks.py --only 02 04

The stored notebooks stay without outputs; files a notebook saves go to a temporary folder.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent


def render(path: Path, out: Path, fast: bool, timeout: int) -> str:
    """Execute one notebook and write ``out/<name>.html``; returns the notebook's title."""
    notebook = nbformat.read(path, as_version=4)
    environment = {**os.environ, "INVVIZ_FAST": "1" if fast else "0"}
    with tempfile.TemporaryDirectory() as scratch:
        NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": scratch}}
        ).execute(env=environment)
    body, _ = HTMLExporter().from_notebook_node(notebook)
    (out / f"{path.stem}.html").write_text(body, encoding="utf-8")
    title = notebook.cells[0].source.splitlines()[0] if notebook.cells else path.stem
    return title.lstrip("# ").strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="output folder (default: site/)")
    parser.add_argument("--fast", action="store_true", help="few steps and small images (INVVIZ_FAST=1)")
    parser.add_argument(
        "--only", nargs="*", default=[], help="notebook number prefixes to render, e.g. 02 07"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args()

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if any(p.name.startswith(prefix) for prefix in args.only)]
    if not notebooks:
        print("no notebooks match", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in notebooks:
        began = time.perf_counter()
        print(f"{path.name} ...", end=" ", flush=True)
        title = render(path, args.out, args.fast, args.timeout)
        print(f"{time.perf_counter() - began:.0f} s", flush=True)
        entries.append(f'<li><a href="{path.stem}.html">{html.escape(title)}</a></li>')
    index = (
        "<!doctype html><meta charset='utf-8'><title>invviz notebooks</title>"
        "<h1>invviz: understanding image representations by inverting them</h1>"
        f"<ol start='0' style='list-style: none'>{''.join(entries)}</ol>"
    )
    (args.out / "index.html").write_text(index, encoding="utf-8")
    print(f"wrote {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
