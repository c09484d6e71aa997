"""One Redis URL, read the same way by producers and workers.

Producers connect with redis-py's ``from_url``; arq's own ``RedisSettings.from_dsn`` reads a
URL differently: it leaves a percent-encoded password encoded (``p%40ss`` is sent as is, so
a password with ``@`` or ``:`` works for the producer and fails for the worker) and drops
every query option, so a ``rediss://`` URL cannot name its CA (``?ssl_ca_certs=...``). Here
the URL is parsed by redis-py's ``parse_url`` and its result mapped onto arq's settings, so
the same URL means the same connection on both sides.
"""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings
from redis.asyncio.connection import SSLConnection, parse_url

#: URL query options a worker applies (redis-py's names).
SSL_OPTIONS = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)

#: Connection tuning a producer may put in the URL; a worker sets its own (it retries
#: forever, see ``WorkerConfig.redis_settings``), so these are accepted and not applied.
#: Any other option is refused rather than silently ignored.
PRODUCER_ONLY_OPTIONS = (
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "retry_on_timeout",
    "max_connections",
    "health_check_interval",
    "timeout",
)


def redis_settings_from_url(url: str) -> RedisSettings:
    """arq ``RedisSettings`` for ``url`` (``redis://``, ``rediss://`` or ``unix://``; user,
    password, database and ``ssl_*`` query options as redis-py reads them).

    Raises ``ValueError`` for another scheme or an unsupported query option.
    """
    kwargs: dict[str, Any] = dict(parse_url(url))
    ssl = kwargs.pop("connection_class", None) is SSLConnection
    path = kwargs.pop("path", None)
    settings = RedisSettings(
        host=kwargs.pop("host", "localhost"),
        port=kwargs.pop("port", 6379),
        unix_socket_path=path,
        database=kwargs.pop("db", 0),
        username=kwargs.pop("username", None),
        password=kwargs.pop("password", None),
        ssl=ssl,
    )
    for option in SSL_OPTIONS:
        if option in kwargs:
            setattr(settings, option, kwargs.pop(option))
    for option in PRODUCER_ONLY_OPTIONS:
        kwargs.pop(option, None)
    if kwargs:
        raise ValueError(
            f"unsupported Redis URL option(s) {sorted(kwargs)}; a worker takes "
            f"db and {', '.join(SSL_OPTIONS)}"
        )
    return settings
