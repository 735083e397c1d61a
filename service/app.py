"""The FastAPI app (DESIGN 7): thin handlers over `Engine` and `Batcher`; state, dependencies, errors, middleware.

  POST /recommend   rank candidates for a history          GET /readyz    200 once models are loaded and warm
  GET  /healthz     the process is alive                   GET /metrics   Prometheus text      GET /docs  OpenAPI

`create_app(settings=None, engine=None)`: without an engine, the lifespan loads one from the settings (in a
thread); `python -m service` loads it first instead, so a bad checkpoint stops the process with one line. After
start-up a background warm-up runs one full batch per domain through the batcher; until it is done /readyz and
/recommend answer 503. Tests override `get_engine` / `get_batcher` / `get_settings` through
`app.dependency_overrides`, or pass `engine=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import Batcher, BatcherClosed, DeadlineExceeded, QueueFull
from service.drain import CloseWhileDraining
from service.engine import Engine
from service.loading import ReloadError, engine_changes, load_engine, reload_engine, served_summary
from service.metrics import CONTENT_TYPE, Metrics
from service.recall import RecallMetrics, RecallModels, recall_data_root
from service.recall import router as recall_router
from service.schemas import (
    TITLE_PATTERN,
    ErrorResponse,
    InputError,
    Limits,
    RecommendRequest,
    RecommendResponse,
    check_limits,
    error_body,
    field_error,
)
from service.settings import Settings, load_settings

log = logging.getLogger("service")


class NotReady(RuntimeError):
    """Models are loading or warming up (or none are served)."""


@dataclass
class ServiceState:
    """What the handlers need, owned by one app."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    batcher: Batcher | None = None
    owns_engine: bool = False  # loaded by this app (and closed by it)
    status: str = "loading"  # loading -> warming up -> ready | no models | warm-up failed; shutting down
    draining: bool = False  # set by the first SIGTERM (service.drain): /readyz 503 `draining`, requests still served
    reloads: int = 0  # successful reloads (POST /admin/reload, SIGHUP)
    _reload_lock: asyncio.Lock | None = None
    _retiring: set | None = None  # tasks closing the batchers (and engines) that a reload replaced

    def new_batcher(self, engine: Engine) -> Batcher:
        s = self.settings
        return Batcher(engine.forward, max_prompts=s.batch_prompts, max_tokens=s.max_batch_tokens,
                       wait_ms=s.batch_wait_ms, queue_prompts=s.queue_prompts, timeout_s=s.request_timeout_s,
                       observer=self.metrics)

    async def reload(self) -> dict[str, Any]:
        """Build a complete new served state from disk (service.loading.reload_engine: models, catalogs, runtime,
        validated by one real request per model), then swap engine and batcher in one step: a request resolves
        both before its first await, so it runs entirely on the old state or entirely on the new one. The old
        batcher finishes what it was given and closes after XCROSS_RELOAD_GRACE_S. Raises ReloadError (the old
        state keeps serving) or RuntimeError when a reload is already running."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        if self._reload_lock.locked():
            raise RuntimeError("a reload is already in progress; retry when it has finished")
        async with self._reload_lock:
            t0 = time.perf_counter()
            new = await run_in_threadpool(reload_engine, self.settings)
            old_engine, old_batcher, owned = self.engine, self.batcher, self.owns_engine
            changes = engine_changes(old_engine, new)
            batcher = self.new_batcher(new)
            self.engine, self.batcher, self.owns_engine = new, batcher, True  # the swap: no await in between
            self.metrics.set_engine(new)
            for key in changes["removed"]:  # xcross_model_info shows what is served now
                with contextlib.suppress(KeyError, AttributeError):
                    self.metrics._model_info.remove(key)
            if self.status in ("no models", "ready") or self.status.startswith("warm-up failed"):
                self.status = "ready" if new.models else "no models"
            self.reloads += 1
            if self._retiring is None:
                self._retiring = set()
            task = asyncio.create_task(self._retire(old_engine if owned else None, old_batcher))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            took = time.perf_counter() - t0
            log.info("reload %d in %.1f s: added %s, removed %s, changed %s", self.reloads, took,
                     changes["added"] or "-", changes["removed"] or "-", changes["changed"] or "-")
            return {"reloaded": True, **changes, "models": served_summary(new), "domains": new.domains,
                    "seconds": round(took, 2)}

    async def _retire(self, engine: Engine | None, batcher: Batcher | None, grace: float | None = None) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(self.settings.reload_grace_s if grace is None else grace)
        if batcher is not None:
            await batcher.close()
        if engine is not None:
            engine.close()

    async def close_retiring(self) -> None:
        for task in list(self._retiring or ()):
            task.cancel()
        await asyncio.gather(*(self._retiring or ()), return_exceptions=True)

    async def warm_up(self) -> None:
        """One full batch per domain through the whole path, then ready."""
        engine, batcher = self.engine, self.batcher
        if not engine.models:
            self.status = "no models"
            return
        if self.settings.warmup:
            self.status = "warming up"
            t0 = time.perf_counter()
            try:
                size = min(self.settings.batch_prompts, self.settings.queue_prompts)
                for req in engine.warmup_requests(candidates=size):
                    prepared = await run_in_threadpool(engine.preprocess, req)
                    await batcher.submit(prepared.key, prepared.prompts)
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log; the process stays up
                log.exception("warm-up failed")
                self.status = f"warm-up failed: {exc}"
                return
            log.info("warm-up done in %.2f s", time.perf_counter() - t0)
        self.status = "ready"

    def readiness(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ready": self.status == "ready", "status": self.status}
        if self.engine is not None:
            body.update(self.engine.describe())
            redis_ok = self.engine.cache.redis_ok
            body["redis"] = "disabled" if redis_ok is None else ("ok" if redis_ok else "down (serving without it)")
        if self.status == "no models":
            body["status"] = (f"no models: no checkpoints under {self.settings.artifacts} "
                              "(XCROSS_ALLOW_EMPTY=1 let the service start without them)")
        if self.draining:  # a load balancer takes the replica out; requests that still arrive are answered
            body["ready"], body["status"] = False, "draining"
        return body

    def drain(self) -> None:
        """SIGTERM (service.drain): /readyz 503 from now on, responses with `Connection: close`."""
        self.draining = True


# --- dependencies (override these in tests; async: trivial, so no thread hop) -------------------------------


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_engine(state: StateDep) -> Engine:
    if state.status != "ready" or state.engine is None:
        raise NotReady(f"not ready: {state.readiness()['status']}; retry shortly (see /readyz)")
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def get_batcher(state: StateDep) -> Batcher:
    if state.batcher is None:
        raise NotReady("not ready: the batcher is not running; retry shortly (see /readyz)")
    return state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


async def valid_request(body: RecommendRequest, settings: SettingsDep) -> RecommendRequest:
    """The body, checked against the configured limits."""
    check_limits(body, Limits(settings.max_history, settings.max_candidates, settings.max_title_chars))
    return body


RecommendDep = Annotated[RecommendRequest, Depends(valid_request)]

# --- handlers -------------------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(413, "body too large"), (415, "body is not JSON"),
                       (422, "invalid request: bad field, unknown domain or item"), (429, "queue full (Retry-After)"),
                       (503, "not ready or shutting down"), (504, "deadline exceeded")]
}
router = APIRouter()


@router.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
async def recommend(req: RecommendDep, engine: EngineDep, batcher: BatcherDep) -> RecommendResponse:
    """Rank the candidates for the history, in the target domain's model."""
    prepared = await run_in_threadpool(engine.preprocess, req)
    scores = await batcher.submit(prepared.key, prepared.prompts)
    return engine.postprocess(prepared, scores)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "loading, warming up, or no models"}})
def readyz(state: StateDep) -> JSONResponse:
    """Models loaded and warm; also reports device, precision, served models and Redis."""
    body = state.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(state: StateDep) -> Response:
    """Prometheus metrics in the text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


# --- errors ------------------------------------------------------------------------------------------------------


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "json_invalid":
            msg = f"invalid JSON at character {e['loc'][-1]}: {(e.get('ctx') or {}).get('error', msg)}"
            e = {**e, "loc": ["body"]}
        errors.append(field_error(e["loc"], msg, e["type"]))
    return errors


def _error(status: int, errors: list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(errors), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_errors(exc))

    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        return _error(422, exc.errors)

    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, [field_error([], str(exc), "queue_full")], {"Retry-After": str(exc.retry_after_s)})

    async def deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return _error(504, [field_error([], str(exc), "deadline_exceeded")])

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, [field_error([], str(exc), "not_ready")], {"Retry-After": "1"})

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(InputError, bad_input)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(DeadlineExceeded, deadline)
    app.add_exception_handler(NotReady, unavailable)
    app.add_exception_handler(BatcherClosed, unavailable)


# --- middleware ------------------------------------------------------------------------------------------------


class BodyGuard:
    """Checks request bodies before routing: over `max_bytes` -> 413; not declared JSON -> 415; not UTF-8 -> 422."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and media != b"application/json" and not media.endswith(b"+json"):
            got = media.decode("latin-1") or "none"
            msg = f"Content-Type is {got!r}; send the request as JSON with 'Content-Type: application/json'"
            return await _error(415, [field_error(["body"], msg, "media_type")])(scope, receive, send)
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            msg = (f"is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start}); "
                   "send the JSON encoded as UTF-8")
            return await _error(422, [field_error(["body"], msg, "unicode_decode")])(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = (f"is larger than {self.max_bytes} bytes (XCROSS_MAX_BODY_BYTES); send fewer items per request")
        await _error(413, [field_error(["body"], msg, "too_large")])(scope, receive, send)


class RequestMetrics:
    """Counts requests and latency by route template and status; tracks requests in flight.

    Responses sent before routing (413 and bad UTF-8 from BodyGuard) are labelled with their path when it is one
    of `paths`, any other path as "unmatched" (so random URLs cannot grow the label set).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str] = frozenset()):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises, the server answers 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.inflight.dec()
            route = getattr(scope.get("route"), "path", None)
            route = route or (scope["path"] if scope["path"] in self.paths else "unmatched")
            self.metrics.observe_request(route, status, time.perf_counter() - t0)


# --- administration (issue 19): POST /admin/reload, SIGHUP ------------------------------------------------------

admin_router = APIRouter()


def _admin_error(status: int, msg: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body([field_error(["header", "authorization"], msg, type_)]), status_code=status,
                        headers=headers)


@admin_router.post("/admin/reload", include_in_schema=False)
async def admin_reload(request: Request, state: StateDep) -> JSONResponse:
    """Rebuild the served models and catalogs from XCROSS_ARTIFACTS and swap them in (off without
    XCROSS_ADMIN_TOKEN: 404; then `Authorization: Bearer <token>`: 401 without, 403 wrong)."""
    token = state.settings.admin_token
    if token is None:
        return _admin_error(404, "the admin endpoint is off: set XCROSS_ADMIN_TOKEN to enable it", "admin_off")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _admin_error(401, "send `Authorization: Bearer <XCROSS_ADMIN_TOKEN>`", "unauthorized",
                            {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        return _admin_error(403, "wrong admin token", "forbidden")
    try:
        body = await state.reload()
        request.app.openapi_schema = None  # /docs publishes the new domains and catalogs
        return JSONResponse(body)
    except ReloadError as exc:
        return JSONResponse({**error_body([field_error(["artifacts"], str(exc), "reload_refused")]),
                             "models": served_summary(state.engine)}, status_code=409)
    except RuntimeError as exc:
        return JSONResponse(error_body([field_error(["artifacts"], str(exc), "reload_in_progress")]),
                            status_code=409)


def _install_sighup(app: FastAPI) -> bool:
    """SIGHUP reloads as POST /admin/reload does (logged; the token is not needed: the operator owns the process).
    Only where the lifespan runs in the main thread's loop (`python -m service`); False elsewhere."""
    state: ServiceState = app.state.service

    async def reload_logged() -> None:
        try:
            await state.reload()
            app.openapi_schema = None
        except (ReloadError, RuntimeError) as exc:
            log.error("SIGHUP: %s", exc)

    try:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_logged()))
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        return False
    return True


# --- the app ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    s = state.settings
    if state.engine is None:
        state.engine, state.owns_engine = await run_in_threadpool(load_engine, s), True
    state.metrics.set_engine(state.engine)
    if not app.state.recall.models:  # POST /recall: artifacts/recall/<dataset>/<variant>/, if any
        app.state.recall = await run_in_threadpool(RecallModels.load_cached, s.artifacts / "recall",
                                                   recall_data_root(s.data_dir))
        app.state.recall_metrics.publish(app.state.recall)
    state.batcher = state.new_batcher(state.engine)
    warm = asyncio.create_task(state.warm_up())
    hup = _install_sighup(app)
    try:
        yield
    finally:
        state.status = "shutting down"
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await asyncio.gather(warm, return_exceptions=True)
        await state.close_retiring()
        await state.batcher.close()
        if state.owns_engine:
            state.engine.close()


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The generated document with the configured limits and the real choices of the loaded state filled in, so
    that the schema and the validation agree: per served domain a RecommendRequest variant (`domain` its name,
    `model` the kinds served for it, item ids in its catalog's range, asins from its catalog), and the served recall
    datasets with their domains and id ranges. Cached once the models are loaded."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc["components"]["schemas"]
    state: ServiceState = app.state.service
    _publish_limits(schemas, settings)
    if state.engine is not None and state.engine.domains:
        _publish_domains(schemas, state.engine)
    if app.state.recall.models:
        _publish_recall(schemas, app.state.recall, settings)
    if state.engine is not None and state.status != "loading":
        app.openapi_schema = doc
    return doc


def _array(prop: dict[str, Any]) -> dict[str, Any]:
    """The array branch of a property (`list[X] | None` is an anyOf with null)."""
    return next((b for b in prop.get("anyOf", []) if b.get("type") == "array"), prop)


def _publish_limits(schemas: dict[str, Any], settings: Settings) -> None:
    req = schemas["RecommendRequest"]["properties"]
    _array(req["history"])["maxItems"] = settings.max_history
    _array(req["candidates"])["maxItems"] = settings.max_candidates
    req["top_k"]["maximum"] = settings.max_candidates
    # an item is exactly one of id, asin, title, none of them null (min/maxProperties 1)
    item = schemas["Item"]["properties"]
    for key in ("id", "asin", "title"):
        prop = item[key]
        branch = next(b for b in prop.pop("anyOf", [prop]) if b.get("type") != "null")
        prop.pop("default", None)
        prop.update(branch)
        for short, long in (("ge", "minimum"), ("le", "maximum")):  # pydantic leaves these in a validated union
            if short in prop:
                prop[long] = prop.pop(short)
    item["title"].update(maxLength=settings.max_title_chars, pattern=TITLE_PATTERN)


def _publish_domains(schemas: dict[str, Any], engine: Engine) -> None:
    base, item = schemas.pop("RecommendRequest"), schemas["Item"]
    variants, mapping = [], {}
    for domain in engine.domains:
        catalog = engine.catalogs[domain]
        it = copy.deepcopy(item)
        it["title"] = f"Item ({domain})"
        it["properties"]["id"]["maximum"] = len(catalog.titles) - 1
        it["properties"]["asin"]["enum"] = sorted({a for a in catalog.asins if a})
        schemas[f"Item{domain}"] = it
        v = copy.deepcopy(base)
        v["title"] = f"RecommendRequest ({domain})"
        props = v["properties"]
        props["domain"] = {"type": "string", "enum": [domain], "title": "Domain",
                           "description": props["domain"].get("description", "")}
        props["model"] = {"anyOf": [{"type": "string", "enum": sorted(engine.kinds(domain))}, {"type": "null"}],
                          "title": "Model", "description": props["model"].get("description", "")}
        for key in ("history", "candidates"):
            _array(props[key])["items"] = {"$ref": f"#/components/schemas/Item{domain}"}
        if not (engine.recall_n > 0 and domain in engine.recall):  # no recall stage: the candidates are required
            props["candidates"] = {**_array(props["candidates"]), "description": props["candidates"].get(
                "description", "")}
            props["candidates"].pop("default", None)
            v["required"] = sorted({*v.get("required", []), "candidates"})
        ref = f"#/components/schemas/RecommendRequest{domain}"
        schemas[f"RecommendRequest{domain}"] = v
        variants.append({"$ref": ref})
        mapping[domain] = ref
    schemas["RecommendRequest"] = {"title": "RecommendRequest", "description": base.get("description", ""),
                                   "oneOf": variants, "discriminator": {"propertyName": "domain", "mapping": mapping}}


def _publish_recall(schemas: dict[str, Any], served: RecallModels, settings: Settings) -> None:
    base = schemas.pop("RecallRequest")
    variants, mapping = [], {}
    for dataset, s in sorted(served.models.items()):
        v = copy.deepcopy(base)
        v["title"] = f"RecallRequest ({dataset})"
        props = v["properties"]
        props["dataset"] = {"type": "string", "enum": [dataset], "title": "Dataset",
                            "description": props["dataset"].get("description", "")}
        props["domain"] = {"type": "string", "enum": list(s.catalog.domains), "title": "Domain",
                           "description": props["domain"].get("description", "")}
        props["history"]["maxItems"] = settings.max_history
        name = "RecallItem" + "".join(part.capitalize() for part in dataset.split("-"))
        it = copy.deepcopy(schemas["RecallItem"])
        it["title"] = f"RecallItem ({dataset})"
        it["properties"]["id"]["maximum"] = s.catalog.n_items
        schemas[name] = it
        props["history"]["items"] = {"$ref": f"#/components/schemas/{name}"}
        ref = f"#/components/schemas/RecallRequest{name.removeprefix('RecallItem')}"
        schemas[ref.rsplit("/", 1)[1]] = v
        variants.append({"$ref": ref})
        mapping[dataset] = ref
    schemas["RecallRequest"] = {"title": "RecallRequest", "description": base.get("description", ""),
                                "oneOf": variants, "discriminator": {"propertyName": "dataset", "mapping": mapping}}


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service app; loads the engine from `settings` at start-up unless one is given."""
    settings = settings or load_settings()
    app = FastAPI(title="X-Cross Serve", version="0.1.0", lifespan=lifespan,
                  description="Next-item recommendation in a target domain from source-domain LoRA experts "
                              "(X-Cross). Errors: 422 names the field, 413 body too large, 429 queue full "
                              "(Retry-After), 503 not ready, 504 deadline.")
    app.state.service = ServiceState(settings, Metrics(), engine)
    app.include_router(router)
    app.include_router(recall_router)
    app.include_router(admin_router)
    app.state.recall, app.state.recall_metrics = RecallModels(), RecallMetrics(app.state.service.metrics.registry)
    _install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.service.metrics,
                       paths=frozenset(route.path for route in router.routes))
    app.add_middleware(CloseWhileDraining, is_draining=lambda: app.state.service.draining)
    app.openapi = lambda: _openapi(app, settings)
    return app
