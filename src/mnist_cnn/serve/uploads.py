"""Reading the images a request carries (a multipart body or a raw image/* body), for every
route that takes images; the body's size and time limits are enforced around this by
`serve.middleware.Guard`, so a reader here only sees bytes that arrived within them."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from mnist_cnn.serve.errors import ApiError, BodyTimeout, BodyTooLarge, too_many_files


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def form_files(request: Request, fields: tuple[str, ...], *,
                     max_files: int) -> list[tuple[str | None, bytes]]:
    """The uploaded files of a multipart body in `fields`, as (filename, bytes)."""
    try:
        form = await request.form(max_files=max_files + 1, max_fields=100)
    except (BodyTooLarge, BodyTimeout, ClientDisconnect, ApiError):
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart and Starlette errors alike
        detail = getattr(error, "detail", None) or getattr(error, "message", None) or type(error).__name__
        if "too many files" in str(detail).lower():
            raise ApiError(422, too_many_files(max_files)) from None
        raise ApiError(422, f"malformed multipart body ({detail})") from None
    try:
        uploads = [value for key, value in form.multi_items() if key in fields and isinstance(value, UploadFile)]
        return [(upload.filename, await upload.read()) for upload in uploads]
    finally:
        await form.close()


async def single_image(request: Request, *, max_files: int) -> bytes:
    """The image of a request: a multipart field `file` or a raw image/* body."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        files = await form_files(request, ("file",), max_files=max_files)
        if len(files) != 1:
            raise ApiError(422, "send one image in the multipart field 'file'"
                           + (" (several: use /api/predict/batch)" if files else ""))
        return files[0][1]
    if kind.startswith("image/"):
        return await request.body()
    raise ApiError(415, f"unsupported content type {kind or '(none)'!r}; send "
                        "multipart/form-data with a field 'file', or an image/* body")


async def batch_images(request: Request, *, max_files: int) -> list[tuple[str | None, bytes]]:
    """The images of a batch request: multipart fields `files` (or `file`), 1 to `max_files`."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with the images in fields 'files'")
    files = await form_files(request, ("files", "file"), max_files=max_files)
    if not files:
        raise ApiError(422, "no files: send the images in multipart fields 'files'")
    if len(files) > max_files:
        raise ApiError(422, too_many_files(max_files))
    return files
