"""The web dashboard at `/`: one static page (vanilla JS, SVG charts drawn by hand, nothing
fetched from the internet) that talks to the same REST API with the user's API key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js", "charts.js", "dashboard.css"}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
@router.get("/jobs/{job_id}", response_class=HTMLResponse)
@router.get("/compare", response_class=HTMLResponse)
def page(job_id: str | None = None) -> FileResponse:
    """The jobs list at `/`, a job's page at `/jobs/{id}`, and the loss curves of several
    jobs overlaid at `/compare?jobs=id,id` (the script reads the path)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the disk
        return FileResponse(STATIC / "index.html", status_code=404)
    media = "text/css" if name.endswith(".css") else "text/javascript"
    return FileResponse(STATIC / name, media_type=media)
