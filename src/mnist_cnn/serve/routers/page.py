"""The page at / with its static files, and the API docs at /docs with Swagger UI's files
served by the app itself: nothing is fetched from another host, so both work offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"
# The page's own policy: scripts, styles and images from this server (and the canvas' blobs).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

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
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title="mnist-cnn API",
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs-assets/favicon.png",
        oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})


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
