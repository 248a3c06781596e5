"""Bearer-token authentication for the REST services (teacher gateway, router API).

`auth: auto` (the default) asks for a token whenever Serve's HTTP proxy listens beyond loopback: a debugging
API that answers anyone on the network is an open door into the cluster's GPUs. The token comes from a file
(a mounted secret) or an environment variable (DANCEOPD_API_TOKEN unless configured otherwise). Python
callers (trainers, `danceopd query` through a handle) go through Ray itself, which has its own token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TOKEN_ENV = "DANCEOPD_API_TOKEN"


class AuthOptions(BaseModel):
    """The REST API's authentication (a mix-in of the gateway's and the router's config)."""

    model_config = ConfigDict(extra="forbid")

    auth: Literal["auto", "on", "off"] = Field("auto", description="auto: a bearer token is required whenever Serve listens beyond "
                                                                 "loopback (or a token source is configured); on: always; off: never")
    auth_token_env: str | None = Field(None, description=f"env var holding the bearer token (default {DEFAULT_TOKEN_ENV})")
    auth_token_file: str | None = Field(None, description="file holding the bearer token (e.g. a mounted secret); wins over the env var")


def is_loopback(host: str | None) -> bool:
    """Whether an HTTP listen address is reachable from this machine only (None: Serve's default, 127.0.0.1)."""
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False


def resolve_token(opts: AuthOptions, listen_host: str | None, service: str, section: str) -> str | None:
    """The token the service requires, or None when auth is off. Raises ValueError naming the fix when a token is
    required and none is set (the service refuses to start open)."""
    required = opts.auth == "on" or (opts.auth == "auto" and (not is_loopback(listen_host) or opts.auth_token_env or opts.auth_token_file))
    if not required:
        return None
    if opts.auth_token_file:
        path = Path(opts.auth_token_file)
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise ValueError(f"{section}.auth_token_file: {path} is missing or empty on the {service}'s node; mount the token there")
        return token
    env = opts.auth_token_env or DEFAULT_TOKEN_ENV
    token = os.environ.get(env, "").strip()
    if not token:
        why = f"it listens on {listen_host}" if not is_loopback(listen_host) else f"{section}.auth is {opts.auth!r}"
        raise ValueError(f"the {service} requires a bearer token ({why}) but ${env} is unset in its environment: set {env} on the "
                         f"cluster, point {section}.auth_token_file at a token file, or set {section}.auth: off for a trusted network")
    return token


def authorized(token: str | None, header: str | None) -> bool:
    """Whether an Authorization header carries the token (always, when auth is off); constant-time."""
    return token is None or hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
