"""How the SDK reaches the server: channel settings, TLS and the per-call headers, in one place
so that the client and the worker connect the same way.

HTTP/2 keep-alive pings are on because a worker's stream can sit idle for long stretches and
must still notice a server that vanished without closing its socket; otherwise its leases
would lapse while it believes it is connected.

Authentication: an API key goes in ``authorization: Bearer <key>`` on every call. It is sent
as plain metadata rather than as gRPC call credentials, because call credentials are refused
on a plaintext channel and the server's keys will be usable on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import grpc.aio

from jobwire.errors import ConfigError

TENANT_HEADER = "jobwire-tenant"
AUTHORIZATION_HEADER = "authorization"

_KEEPALIVE_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect soon after a server restart rather than after gRPC's default of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


@dataclass(frozen=True)
class Tls:
    """TLS settings. With none of them set, an ``https://`` URL uses the system's roots.

    ``root_certificates`` are PEM bytes trusted for the server; ``client_certificate`` and
    ``client_key`` (PEM) present a client identity (mutual TLS); ``server_name`` overrides the
    name checked in the server's certificate (for test certificates).
    """

    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Connection:
    """Where and how to connect; built once, checked once."""

    target: str
    tls: Tls | None
    metadata: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def parse(
        cls, url: str, *, tenant: str | None, api_key: str | None, tls: Tls | None
    ) -> Connection:
        """``url`` is ``http://host:port`` (plaintext), ``https://host:port`` (TLS) or bare
        ``host:port`` (plaintext unless ``tls`` is given)."""
        if "://" in url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"invalid server address {url!r}: use http://host:port")
            target = parts.netloc
            if parts.scheme == "https" and tls is None:
                tls = Tls()
        else:
            target = url
        if not target:
            raise ConfigError("the server address is empty")
        metadata: list[tuple[str, str]] = []
        if tenant is not None:
            if not tenant or not tenant.isascii() or not tenant.isprintable():
                raise ConfigError(f"the tenant {tenant!r} is not a valid header value")
            metadata.append((TENANT_HEADER, tenant))
        if api_key is not None:
            if not api_key or not api_key.isascii() or not api_key.isprintable():
                raise ConfigError("the API key must be printable ASCII")
            metadata.append((AUTHORIZATION_HEADER, f"Bearer {api_key}"))
        return cls(target=target, tls=tls, metadata=tuple(metadata))

    def channel(self) -> grpc.aio.Channel:
        """A new channel; it connects lazily and reconnects by itself."""
        options = list(_KEEPALIVE_OPTIONS)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls.root_certificates,
            private_key=self.tls.client_key,
            certificate_chain=self.tls.client_certificate,
        )
        return grpc.aio.secure_channel(self.target, credentials, options=options)
