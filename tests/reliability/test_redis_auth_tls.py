"""Redis with a password, and behind TLS: a worker and producers connect with the same kind
of URL (``redis://:pw@...``, ``rediss://:pw@...?ssl_ca_certs=...``), a wrong password or an
untrusted certificate is a clear ``QueueUnavailableError``, the password never shows in
logs or messages, and what crosses the wire is msgpack, never pickle."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import msgspec
import pytest
import redis
from reliability_support import PasswordRedis, TlsProxy, make_tls_files

from lorafleet.producer import SamplingParams, SyncClient
from lorafleet.producer.codec import decode_result
from lorafleet.producer.errors import QueueUnavailableError
from lorafleet.producer.keys import arq_result_key
from lorafleet.worker.local.launcher import WorkerProcess

pytestmark = pytest.mark.slow

# Characters that must be percent-encoded in a URL, and that arq alone would get wrong.
PASSWORD = "s3cret@with:odd/chars"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@dataclass(frozen=True)
class TlsFleet:
    server: PasswordRedis
    tls_port: int
    tls_url: str  # rediss://, password, trusting the test certificate
    worker: WorkerProcess

    @property
    def queue(self) -> str:
        return self.worker.config.queue


@pytest.fixture(scope="module")
def tls_fleet(make_config, start_worker, tmp_path_factory):
    """A password-protected Redis, a TLS endpoint in front of it, and a worker that reaches
    Redis only through TLS."""
    cert, key = make_tls_files(tmp_path_factory.mktemp("tls"))
    with PasswordRedis(PASSWORD) as server, TlsProxy(server.port, cert, key) as proxy:
        tls_url = server.url_with(PASSWORD, scheme="rediss", port=proxy.port)
        tls_url += f"?ssl_ca_certs={cert}&ssl_check_hostname=true"
        yield TlsFleet(server, proxy.port, tls_url, start_worker(make_config(tls_url)))


def _generate(url: str, queue: str) -> list[int]:
    with SyncClient(url, queue_name=queue, connect_timeout=3) as client:
        return client.generate("over TLS", GREEDY)[0].outputs[0].token_ids


def test_producers_reach_a_tls_worker_with_a_password(tls_fleet):
    fleet = tls_fleet
    assert _generate(fleet.tls_url, fleet.queue) == _generate(fleet.server.url, fleet.queue)
    log = fleet.worker.log_tail(100_000)
    assert "ready" in log and PASSWORD not in log


def test_a_wrong_password_or_an_untrusted_certificate_is_a_clear_error(tls_fleet):
    wrong = tls_fleet.server.url_with("not-the-password")
    with pytest.raises(QueueUnavailableError) as info:
        _generate(wrong, tls_fleet.queue)
    assert "not-the-password" not in str(info.value) and ":***@" in str(info.value)
    untrusted = tls_fleet.tls_url.split("?")[0]  # the system CAs do not know our certificate
    with pytest.raises(QueueUnavailableError, match="certificate"):
        _generate(untrusted, tls_fleet.queue)


def test_nothing_on_the_wire_is_pickled(tls_fleet):
    with SyncClient(tls_fleet.tls_url, queue_name=tls_fleet.queue) as client:
        handle = client.submit("stored", GREEDY)
        handle.result(timeout=30)
    with redis.Redis.from_url(tls_fleet.server.url) as r:
        stored = [r.get(arq_result_key(handle.job_id))]
        stored += [v for _, f in r.xrange(f"lorafleet:stream:{handle.job_id}") for v in f.values()]
    assert len(stored) >= 2
    for data in stored:
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(data)
        msgspec.msgpack.decode(data)  # every stored value is plain msgpack
    envelope = msgspec.msgpack.decode(stored[0])
    assert decode_result(envelope["r"]).output.request_id == handle.job_id


def test_tls_is_really_on(tls_fleet):
    """The TLS endpoint speaks only TLS: a plain connection to it gets no Redis reply."""
    plain = redis.Redis(
        host="127.0.0.1", port=tls_fleet.tls_port, password=PASSWORD, socket_timeout=2
    )
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()
