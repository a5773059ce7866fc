"""Connection settings, checked once when a client or worker is made."""

from __future__ import annotations

import os

import pytest

import jobwire
from jobwire._transport import Connection


def test_tenant_and_api_key_travel_as_headers() -> None:
    connection = Connection.parse(
        "http://127.0.0.1:50051", tenant="acme", api_key="k-123", tls=None
    )
    assert connection.target == "127.0.0.1:50051"
    assert connection.tls is None
    assert dict(connection.metadata) == {
        "jobwire-tenant": "acme",
        "authorization": "Bearer k-123",
    }
    assert Connection.parse("localhost:1", tenant=None, api_key=None, tls=None).metadata == ()


def test_an_https_url_or_tls_settings_make_a_secure_channel() -> None:
    assert Connection.parse("https://jobs.example:443", tenant=None, api_key=None, tls=None).tls
    tls = jobwire.Tls(root_certificates=b"pem", server_name="jobwire.test")
    assert Connection.parse("jobs.example:443", tenant=None, api_key=None, tls=tls).tls is tls


@pytest.mark.parametrize(
    ("url", "tenant"), [("ftp://x:1", None), ("http://", None), ("x:1", ""), ("x:1", "a\nb")]
)
def test_bad_settings_are_refused_up_front(url: str, tenant: str | None) -> None:
    with pytest.raises(jobwire.ConfigError):
        Connection.parse(url, tenant=tenant, api_key=None, tls=None)


def test_worker_settings_are_checked_when_it_is_made() -> None:
    with pytest.raises(jobwire.ConfigError, match="concurrency"):
        jobwire.Worker(concurrency=0)
    with pytest.raises(jobwire.ConfigError, match="worker id"):
        jobwire.Worker(worker_id="w" * 129)
    worker = jobwire.Worker()
    assert str(os.getpid()) in worker.worker_id
