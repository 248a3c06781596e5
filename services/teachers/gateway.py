"""REST gateway (FastAPI on Serve) for debugging teachers: list fields, query a velocity, health.

    GET  /healthz
    GET  /v1/fields
    POST /v1/fields/{name}/velocity   {"x": {"b64", "shape"} | {"npy_b64"}, "sigma": 0.5 | [...],
                                       "prompt": "a red circle" | [...], "source": {...}?, "return_x0_png": false}
Bad input never reaches a model: every problem is a 4xx with {"error": {"field", "message"}}.
No `from __future__ import annotations` here: FastAPI must see real annotations (e.g. `Request`) on the
ingress methods.
"""


import asyncio
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictFloat, ValidationError
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException

from danceopd.auth import authorized, resolve_token
from danceopd.contracts import QueryError, VelocityQuery, info_from_dict
from danceopd.remote import RequestError, error_responses
from services.teachers.codec import decode_array, encode_array, image_png_b64
from services.teachers.config import TeachersConfig

app = FastAPI(title="DanceOPD teacher fields", version="1",
              description="Debug access to the teacher velocity fields served on Ray Serve.")


class VelocityRequest(BaseModel):
    x: dict = Field(description="state x_sigma: {'b64': base64 little-endian float32, 'shape': [B,C,H,W]} or {'npy_b64': ...}")
    # Strict: "0.5" and true are refused, not coerced; ints are accepted as floats.
    sigma: StrictFloat | list[StrictFloat] = Field(description="noise level(s) in [0, 1]; one value is used for every sample")
    prompt: str | list[str] = Field("", description="prompt(s); '' = unconditional; one string is used for every sample")
    source: dict | None = Field(None, description="source image(s) for edit teachers, encoded like x")
    return_x0_png: bool = Field(False, description="also return x0_hat = x - sigma v of the first sample as a PNG")
    adapter: str | None = Field(None, description="for a shared-base teacher (adapter bank): which of its teachers answers")


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=RequestError(field, message).body())


def _teacher_failure(name: str, e: Exception, timeout: float) -> JSONResponse:
    """A teacher call that did not answer: 504 on a timeout, 503 for a replica that died, restarts or ran out
    of memory (the client may retry), the teacher's own 4xx for input it refused."""
    if isinstance(e, asyncio.TimeoutError):
        return _error(504, "teacher", f"teacher {name!r} did not answer within {timeout} s")
    cause = e.cause if isinstance(e, RayTaskError) else None
    if isinstance(cause, RequestError):
        return JSONResponse(status_code=cause.status, content=cause.body())
    return _error(503, "teacher", f"teacher {name!r} is unavailable ({type(e).__name__}); retry, or read its replica log")


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid"}
    field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return _error(422, field, first["msg"])


@serve.deployment(name="TeacherGateway")
@serve.ingress(app)
class TeacherGateway:
    def __init__(self, teachers: dict, listen_host: str | None = None):
        self.cfg = TeachersConfig.model_validate(teachers)
        g = self.cfg.gateway
        self.token = resolve_token(g, listen_host, "REST gateway", "gateway")  # refuses to start open beyond loopback
        self.max_bytes = int(g.max_payload_mb * 2**20)
        self.handles = {t.name: serve.get_deployment_handle("TeacherServer", app_name=self.cfg.app_name(t.name))
                        for t in self.cfg.teachers if t.deploy}
        self.infos: dict[str, dict] = {}

    async def _info(self, name: str) -> dict:
        if name not in self.infos:
            self.infos[name] = await asyncio.wait_for(self.handles[name].describe.remote(), self.cfg.gateway.request_timeout_s)
        return self.infos[name]

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if authorized(self.token, request.headers.get("authorization")):
            return None
        return _error(401, "authorization", "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness, open without a token (for load balancers): `{"status": "ok", "teachers": [...]}`."""
        return {"status": "ok", "teachers": list(self.handles)}

    @app.get("/v1/fields", responses=error_responses(s401="missing or wrong bearer token",
                                                     s503="a teacher's replica is unavailable",
                                                     s504="a teacher did not answer within gateway.request_timeout_s"))
    async def fields(self, request: Request):
        """Every deployed teacher: name, kind, sample shape (and its aspect-ratio bucket shapes), whether it takes or
        requires a source image, guidance, device, and for model teachers the family, resolution and `weights_sha256` (the
        merged weights it answers with)."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        infos = []
        for n in self.handles:
            try:
                infos.append(await self._info(n))
            except (asyncio.TimeoutError, RayError, RayServeException) as e:
                return _teacher_failure(n, e, self.cfg.gateway.request_timeout_s)
        keep = ("name", "kind", "sample_shape", "bucket_shapes", "takes_source", "requires_source", "guidance", "device",
                "family", "resolution", "weights_sha256")  # bucket_shapes and the last three: model teachers only
        return {"fields": [{k: i[k] for k in keep if k in i} for i in infos]}

    # The body is read by hand (its size enforced while reading), so FastAPI is told its schema.
    @app.post("/v1/fields/{name}/velocity", openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": VelocityRequest.model_json_schema()}}}},
              responses=error_responses(s401="missing or wrong bearer token",
                                        s404="unknown teacher", s413="payload over gateway.max_payload_mb",
                                        s422="an input the teacher cannot answer (the field is named)",
                                        s503="the teacher's replica is unavailable (restarting, out of memory)",
                                        s504="the teacher did not answer within gateway.request_timeout_s"))
    async def velocity(self, name: str, request: Request):
        """The teacher `name`'s velocity v(x, sigma, prompt[, source]): `{"teacher", "velocity": {"b64", "shape"} in x's
        layout, "elapsed_ms"}`, and `x0_png_b64` (the first sample's x0_hat = x - sigma v as a PNG) when asked. Bad input never reaches the model: shape, dtype,
        NaN/inf, sigma range, prompt count, a missing source and the encoding are checked first (422)."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if name not in self.handles:
            return _error(404, "name", f"unknown teacher {name!r}; available: {sorted(self.handles)}")
        body = await self._read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = VelocityRequest.model_validate_json(body)
        except ValidationError as e:  # also raised for malformed JSON
            first = e.errors()[0]
            # The top-level key only: a union's branch ("sigma.float") is pydantic's detail, not the user's field.
            return _error(422, str(first["loc"][0]) if first["loc"] else "body", first["msg"])
        timeout = self.cfg.gateway.request_timeout_s
        start = time.perf_counter()
        try:
            query = self._query(req)
            info = info_from_dict(await self._info(name))
            query.validate(info)
            v = await asyncio.wait_for(self.handles[name].velocity.remote(query), timeout)
        except QueryError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        except (asyncio.TimeoutError, RayError, RayServeException) as e:
            return _teacher_failure(name, e, timeout)
        out = {"teacher": name, "velocity": encode_array(v), "elapsed_ms": 1000 * (time.perf_counter() - start)}
        if req.return_x0_png:
            x0 = query.x[0] - float(query.sigma[0]) * v[0]
            out["x0_png_b64"] = image_png_b64(x0)
        return out

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        """The body, read with its size enforced while reading (a chunked body has no content-length to trust)."""
        limit = f"gateway.max_payload_mb={self.cfg.gateway.max_payload_mb}"
        declared = request.headers.get("content-length")
        # Refused before reading: a false claim cannot make us wait. (Serve's HTTP proxy already answers a
        # malformed content-length with a 400.)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return _error(413, "body", f"payload of {declared} bytes exceeds {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                return _error(413, "body", f"payload of more than {self.max_bytes} bytes exceeds {limit}")
        return bytes(body)

    @staticmethod
    def _query(req: VelocityRequest) -> VelocityQuery:
        x = decode_array(req.x, "x")
        if x.ndim == 3:
            x = x[None]
        b = x.shape[0] if x.ndim >= 1 else 0
        sigma = np.full(b, req.sigma, dtype=np.float32) if isinstance(req.sigma, float | int) else np.asarray(req.sigma, dtype=np.float32)
        prompts = [req.prompt] * b if isinstance(req.prompt, str) else list(req.prompt)
        source = None
        if req.source is not None:
            source = decode_array(req.source, "source")
            if source.ndim == 3:
                source = source[None]
        return VelocityQuery(x, sigma, prompts, source, req.adapter)


def gateway_args(cfg: TeachersConfig) -> dict:
    """The gateway needs each teacher's name and field only: scaling a teacher never restarts it."""
    return {"teachers": [{"name": t.name, "field": t.field.model_dump(mode="json"), **({} if t.deploy else {"deploy": False})}
                         for t in cfg.teachers],
            "app_prefix": cfg.app_prefix, "gateway": cfg.gateway.model_dump(mode="json", exclude_defaults=True),
            "router": {"enabled": False}}


def gateway_deployment(cfg: TeachersConfig, listen_host: str | None = None):
    """`listen_host`: where Serve's HTTP proxy listens (auth: auto requires a token beyond loopback)."""
    return TeacherGateway.options(ray_actor_options={"num_cpus": cfg.gateway.num_cpus}).bind(gateway_args(cfg), listen_host)
