"""The page at / with its static files, and the API docs at /docs with Swagger UI's files
served by the app itself: nothing is fetched from another host, so both work offline."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from mnist_cnn.serve.middleware import PAGE_CSP

STATIC_DIR = Path(__file__).parent.parent / "static"
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)


@router.get("/")
async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"content-security-policy": PAGE_CSP,
                                 "x-content-type-options": "nosniff", "cache-control": "no-cache"})


@docs_router.get("/docs")
async def docs(request: Request):
    root = request.scope.get("root_path", "")
    html = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title="mnist-cnn API",
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs-assets/favicon.png",
        oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})
    html.headers["content-security-policy"] = docs_csp(html.body)
    return html


def docs_csp(page: bytes) -> str:
    """Swagger UI's page starts it with an inline script: that script (by its hash) and this
    server's files may run, nothing else."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                      for script in INLINE_SCRIPT.findall(page))
    return (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def swagger_assets() -> Path | None:
    """Swagger UI's files as installed by fastapi-offline, or None without it."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def mount_page(app: FastAPI) -> None:
    """The page's router and static files; /docs only where Swagger UI's files are installed."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    assets = swagger_assets()
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
        app.include_router(docs_router)
