"""The admin HTTP API (FastAPI): quotas, usage, health and Prometheus metrics.

Every route is served under ``/api`` and without the prefix (as LMCache >= 0.4.5 ships
them, so its ``lmcache quota`` CLI works against us). ``_default`` in a path names the
empty salt. Bad salts and bad bodies are a 400 with a JSON error naming the field, never
a 422 or a 500. When a token is configured, mutating routes need
``Authorization: Bearer <token>``. Needs the ``server`` extra.
"""

from __future__ import annotations

import hmac
import json
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexkv_store.config import is_loopback_host
from flexkv_store.errors import FlexKVStoreError, InvalidKeyError
from flexkv_store.metrics import CONTENT_TYPE
from flexkv_store.quota._manager import GIB, QuotaInfo, api_salt
from flexkv_store.quota._userlru import Tally

_T = TypeVar("_T")

if TYPE_CHECKING:
    from flexkv_store.store import Store

__all__ = ["ApiError", "create_app"]

#: Largest quota the API accepts (1 EiB); beyond it a typo is likelier than a real limit.
MAX_LIMIT_BYTES = 1 << 60


class ApiError(Exception):
    """An error answered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _quota_entry(info: QuotaInfo) -> dict[str, Any]:
    d = info.as_dict()
    return {k: d[k] for k in ("limit_gb", "limit_bytes", "current_usage_gb",
                              "current_usage_bytes", "objects")}  # fmt: skip


def _path_salt(raw: str, request: Request | None = None) -> str:
    if request is not None and "\ufffd" in raw:
        # The server decoded the path with replacement characters: reject bytes that are
        # not UTF-8 instead of storing a quota for a salt the client never sent.
        try:
            urllib.parse.unquote_to_bytes(request.scope.get("raw_path", b"")).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "cache_salt: must be valid UTF-8", "cache_salt") from None
    if raw == "":
        raise ApiError(400, "cache_salt: must not be empty (use _default for the empty salt)",
                       "cache_salt")  # fmt: skip
    try:
        return api_salt(raw)
    except InvalidKeyError as exc:
        raise ApiError(400, str(exc), "cache_salt") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_limit(body: bytes) -> int:
    """The quota in bytes from a PUT body: exactly one of limit_gb / limit_bytes.

    The body is read as JSON whatever its Content-Type (curl's ``-d`` says form data).
    """
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"body: must be a JSON object ({exc})", "body") from None
    except RecursionError:
        raise ApiError(400, "body: nested too deeply to be a quota", "body") from None
    if not isinstance(doc, dict):
        raise ApiError(400, 'body: must be a JSON object like {"limit_gb": 1}', "body")
    given = [k for k in ("limit_gb", "limit_bytes") if k in doc]
    extra = sorted(set(doc) - {"limit_gb", "limit_bytes"})
    if extra:
        raise ApiError(400, f"body: unknown keys {extra}; give limit_gb or limit_bytes", "body")
    if len(given) != 1:
        raise ApiError(400, "body: give exactly one of limit_gb and limit_bytes", "body")
    field = given[0]
    value = doc[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{field}: must be a number", field)
    if isinstance(value, int) and value > MAX_LIMIT_BYTES:  # too big for a float, too
        raise ApiError(400, f"{field}: must be at most {MAX_LIMIT_BYTES} bytes (1 EiB)", field)
    if not math.isfinite(value):
        raise ApiError(400, f"{field}: must be finite", field)
    if value < 0:
        raise ApiError(400, f"{field}: must not be negative", field)
    if field == "limit_bytes" and isinstance(value, float) and not value.is_integer():
        raise ApiError(400, "limit_bytes: must be a whole number of bytes", field)
    scaled = value * GIB if field == "limit_gb" else value
    # Compare before converting: a huge finite limit_gb overflows to inf when scaled.
    if not scaled <= MAX_LIMIT_BYTES:
        raise ApiError(400, f"{field}: must be at most {MAX_LIMIT_BYTES} bytes (1 EiB)", field)
    return round(scaled) if field == "limit_gb" else int(scaled)


_PUT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {"limit_gb": {"type": "number", "minimum": 0}},
                            "required": ["limit_gb"],
                            "additionalProperties": False,
                        },
                        {
                            "type": "object",
                            "properties": {"limit_bytes": {"type": "integer", "minimum": 0}},
                            "required": ["limit_bytes"],
                            "additionalProperties": False,
                        },
                    ]
                }
            }
        },
    }
}
_ERROR = {"description": "bad salt or body", "content": {"application/json": {}}}
_UNAUTH = {"description": "missing or wrong bearer token", "content": {"application/json": {}}}


def create_app(
    store: Store,
    token: str | None = None,
    *,
    title: str = "flexkv-store",
    local_requests_need_token: bool = True,
) -> FastAPI:
    """The admin API for ``store``; mutating routes need ``token`` when one is given.

    ``local_requests_need_token=False`` lets clients connecting from a loopback address
    change quotas without it (LMCache's ``lmcache quota`` sends no token); every other
    client still needs it. Behind a reverse proxy on the same host every request comes
    from loopback: do not use it there.

    Mount it in an engine's own ASGI server or serve it with ``flexkv-store serve``.
    """
    app = FastAPI(
        title=f"{title} admin API",
        version=_version(),
        description="Per-tenant (cache_salt) quotas, usage, health and metrics.",
    )
    started = time.time()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": exc.message, "field": exc.field}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(exc.errors()), "field": None}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = str(request.scope.get("path", ""))  # decoded; url.path drops control chars
        for prefix in ("/api/quota/", "/quota/"):
            # The path converter does not match line breaks, so such salts end up here.
            if exc.status_code == 404 and path.startswith(prefix):
                try:
                    _path_salt(path[len(prefix) :])
                except ApiError as bad:
                    return await _api_error(request, bad)
        return JSONResponse({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    @app.exception_handler(FlexKVStoreError)
    async def _store_error(request: Request, exc: FlexKVStoreError) -> JSONResponse:
        status = 400 if isinstance(exc, ValueError) else 503
        return JSONResponse({"error": str(exc), "field": None}, status_code=status)

    def require_token(request: Request) -> None:
        if token is None:
            return
        client = request.client
        if not local_requests_need_token and client is not None and is_loopback_host(client.host):
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    async def on_store(fn: Callable[[], Awaitable[_T]]) -> _T:
        # The store's locks and bookkeeping belong to its own loop, which is not this
        # server's when the store is driven by store.blocking() (an engine's threads).
        async def run() -> _T:
            await store.open()
            return await fn()

        return await store.run_on_loop(run)

    async def read(fn: Callable[[], _T]) -> _T:
        async def now() -> _T:
            await store.refresh()  # a shared accounting: read its current figures
            return fn()

        return await on_store(now)

    router = APIRouter()

    @router.get("/quota", summary="Every salt with a quota or usage")
    async def list_quotas() -> dict[str, Any]:
        users = await read(store.quota.usage)
        return {"users": {i.as_dict()["cache_salt"]: _quota_entry(i) for i in users.values()}}

    @router.get(
        "/quota/{cache_salt:path}", summary="One salt's quota and usage", responses={400: _ERROR}
    )
    async def get_quota(cache_salt: str, request: Request) -> dict[str, Any]:
        salt = _path_salt(cache_salt, request)
        return await read(lambda: store.quota.info(salt or "_default").as_dict())

    @router.put(
        "/quota/{cache_salt:path}",
        summary="Set a salt's quota (evicts down to it at once)",
        openapi_extra=_PUT_BODY,
        responses={400: _ERROR, 401: _UNAUTH},
    )
    async def put_quota(cache_salt: str, request: Request) -> dict[str, Any]:
        require_token(request)
        salt = _path_salt(cache_salt, request)
        limit = parse_limit(await request.body())
        evicted = await on_store(lambda: store.quota.set_quota(salt or "_default", limit))
        return {
            "cache_salt": salt or "_default",
            "limit_gb": limit / GIB,
            "limit_bytes": limit,
            "status": "ok",
            "evicted_objects": evicted.objects,
            "evicted_bytes": evicted.nbytes,
        }

    @router.delete(
        "/quota/{cache_salt:path}",
        summary="Remove a salt's quota (it falls back to the default)",
        responses={400: _ERROR, 401: _UNAUTH},
    )
    async def delete_quota(cache_salt: str, request: Request) -> dict[str, Any]:
        require_token(request)
        salt = _path_salt(cache_salt, request)
        existed = await on_store(lambda: store.quota.delete_quota(salt or "_default"))
        return {"cache_salt": salt or "_default", "status": "removed" if existed else "not_found"}

    @router.get("/usage", summary="Totals per salt and per backend")
    async def usage() -> dict[str, Any]:
        return await read(usage_now)

    def _evicted(salt: str) -> Tally:
        report = store.accounting.peek(salt)
        return Tally(0, 0) if report is None else report.evicted

    def usage_now() -> dict[str, Any]:
        info = store.info()
        users = store.quota.usage()
        return {
            "total_bytes": info["total_bytes"],
            "total_objects": info["total_objects"],
            "capacity_bytes": info["capacity_bytes"],
            "default_quota_bytes": info["default_quota_bytes"],
            "users": {
                i.as_dict()["cache_salt"]: {
                    **_quota_entry(i),
                    "evicted_objects": _evicted(i.cache_salt).objects,
                    "evicted_bytes": _evicted(i.cache_salt).nbytes,
                }
                for i in users.values()
            },
            "backends": info["backends"],
            "l1": info["l1"],
        }

    @router.get("/health", summary="Liveness and backend status")
    async def health() -> dict[str, Any]:
        backends = await read(lambda: store.info()["backends"])
        return {"status": "ok", "uptime_s": round(time.time() - started, 3), "backends": backends}

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body = await read(lambda: store.metrics.render() if store.metrics is not None else b"")
        return Response(body, media_type=CONTENT_TYPE)

    app.include_router(router, prefix="/api")
    app.include_router(router)
    return app


def _version() -> str:
    from flexkv_store import __version__

    return __version__
