"""`danceopd query`: ask a teacher for a velocity over REST, save it and the x0_hat preview."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


class CliError(Exception):
    """Bad input on the command line or from the server (exit 2)."""


class ServerSaid(CliError):
    """An HTTP error answer (its status in `code`)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def http_json(method: str, url: str, body: dict | None, token: str | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read()).get("error", {})
            message = f"server said {e.code}: {err.get('field', '?')}: {err.get('message', e.reason)}"
        except (ValueError, AttributeError):
            message = f"server said {e.code}: {e.reason}"
        raise ServerSaid(message, e.code) from None


def load_source(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """The source as the teacher takes it: a PNG for a pixel teacher, a .npy of the latent [C, H, W] for a latent one."""
    if not path.exists():
        raise CliError(f"--source {path} does not exist")
    c, h, w = shape
    if path.suffix == ".npy":
        arr = np.load(path).astype(np.float32)
        if tuple(arr.shape) != tuple(shape):
            raise CliError(f"--source {path}: shape {list(arr.shape)}, the teacher takes [{c}, {h}, {w}]")
        return arr
    img = Image.open(path).convert("RGB")
    if c != 3:
        raise CliError(f"--source: the teacher works on {c}-channel latents, not RGB images: give the source's latent as a .npy "
                       f"of shape [{c}, {h}, {w}] (--source latent.npy)")
    if img.size != (w, h):
        img = img.resize((w, h), Image.NEAREST)
    return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def add_parser(sub) -> None:
    q = sub.add_parser("query", help="query a teacher's velocity over REST and save velocity.npy + x0.png")
    q.add_argument("teacher")
    q.add_argument("--prompt", default="", help="prompt or edit instruction ('' = unconditional)")
    q.add_argument("--sigma", type=float, required=True, help="noise level in [0, 1]")
    q.add_argument("--source", type=Path, help="source for edit teachers: a PNG (pixel teachers) or its latent as a .npy [C,H,W]")
    q.add_argument("--x", type=Path, help="state x as .npy [B,C,H,W] or [C,H,W] float32 (default: seeded Gaussian noise)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--url", default=os.environ.get("DANCEOPD_URL", "http://127.0.0.1:8000"))
    q.add_argument("--token", default=os.environ.get("DANCEOPD_API_TOKEN"), help="bearer token (default: $DANCEOPD_API_TOKEN)")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    q.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the teacher to come up (just deployed: "
                   "unreachable, or 404/503 while Serve starts it) before giving up")
    q.add_argument("--out", type=Path, default=Path("query-out"))
    q.set_defaults(run=run_query)


def run_query(args) -> int:
    import time

    if not 0.0 <= args.sigma <= 1.0:
        raise CliError(f"--sigma {args.sigma} must lie in [0, 1]")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            return query_once(args)
        except (urllib.error.URLError, ConnectionError, ServerSaid) as e:
            coming_up = not isinstance(e, ServerSaid) or e.code in (404, 502, 503, 504)
            if not coming_up or time.monotonic() > deadline:
                if isinstance(e, ServerSaid):
                    raise
                print(f"error: cannot reach {args.url}: {getattr(e, 'reason', e)}", file=sys.stderr)
                return 1
            time.sleep(2)


def query_once(args) -> int:
    base = args.url.rstrip("/")
    fields = {f["name"]: f for f in http_json("GET", f"{base}/v1/fields", None, args.token, args.timeout)["fields"]}
    if args.teacher not in fields:
        raise CliError(f"unknown teacher {args.teacher!r}; available: {sorted(fields)}")
    shape = tuple(fields[args.teacher]["sample_shape"])
    if args.x is not None:
        x = np.load(args.x).astype(np.float32)
    else:
        x = np.random.default_rng(args.seed).standard_normal((1, *shape)).astype(np.float32)
    body = {"x": {"npy_b64": _npy_b64(x)}, "sigma": args.sigma, "prompt": args.prompt, "return_x0_png": True}
    if args.source is not None:
        body["source"] = {"npy_b64": _npy_b64(load_source(args.source, shape)[None].repeat(x.shape[0] if x.ndim == 4 else 1, 0))}
    reply = http_json("POST", f"{base}/v1/fields/{args.teacher}/velocity", body, args.token, args.timeout)
    v = np.frombuffer(base64.b64decode(reply["velocity"]["b64"]), dtype="<f4").reshape(reply["velocity"]["shape"])
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "velocity.npy", v)
    (args.out / "x0.png").write_bytes(base64.b64decode(reply["x0_png_b64"]))
    print(f"teacher {args.teacher}: velocity {list(v.shape)}, |v| rms {float(np.sqrt((v ** 2).mean())):.4f}, "
          f"{reply['elapsed_ms']:.1f} ms\nsaved {args.out / 'velocity.npy'} and {args.out / 'x0.png'}")
    return 0


def _npy_b64(a: np.ndarray) -> str:
    import io

    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32))
    return base64.b64encode(buf.getvalue()).decode()
