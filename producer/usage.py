"""What a request is metered by: its ``tenant`` and the ``Usage`` on its result.

A job may name a ``tenant`` (the customer it runs for, like OpenAI's ``user``); the worker
meters every job it completes under that tenant and the job's adapter (see
``lorafleet.producer.ledger``). ``Usage`` travels on every ``RequestOutput``: through the
queue (result, final stream event) and in process (``LLM.generate``).
"""

from __future__ import annotations

import re

import msgspec

#: Longest tenant name accepted.
MAX_TENANT_LEN = 64
#: Letters, digits and ``. _ : @ -``, starting with a letter or digit: safe in Redis keys,
#: Prometheus label values, CSV cells and shell arguments without quoting.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
TENANT_RULE = (
    f"1 to {MAX_TENANT_LEN} characters: letters, digits and . _ : @ -, starting with a "
    "letter or digit"
)


def tenant_problem(tenant: object) -> str | None:
    """Why ``tenant`` is not a valid tenant name, or None if it is (``None`` is valid: no
    tenant)."""
    if tenant is None:
        return None
    if not isinstance(tenant, str):
        return f"tenant must be a str or None, got {type(tenant).__name__}"
    if not tenant:
        return f"tenant cannot be empty (leave it out for no tenant; a tenant is {TENANT_RULE})"
    if len(tenant) > MAX_TENANT_LEN:
        return f"tenant is {len(tenant)} characters long; at most {MAX_TENANT_LEN} allowed"
    if not _TENANT.fullmatch(tenant):
        return f"tenant {tenant!r} is not valid: a tenant is {TENANT_RULE}"
    return None


def check_tenant(tenant: object) -> str | None:
    """``tenant`` unchanged if valid, else ``ValueError`` naming the problem."""
    problem = tenant_problem(tenant)
    if problem is not None:
        raise ValueError(problem)
    return tenant  # type: ignore[return-value]


class Usage(msgspec.Struct, kw_only=True):
    """What one request cost (OpenAI's ``usage`` names where they exist).

    - ``prompt_tokens``: tokens of the prompt (a chat conversation as rendered), counted once
      however many completions ``n`` asks for;
    - ``completion_tokens``: tokens of all completions, every one returned counted (those a
      re-run continued from included: the client receives them);
    - ``engine_s``: seconds from the engine taking the request to its end (waiting for room
      in a batch included);
    - ``adapter_load_s``: seconds spent loading the request's adapter because of this request:
      a read from disk into the CPU cache and/or a write into a device slot (0 when the
      adapter was already where it was needed);
    - ``queue_wait_s``: seconds from enqueue (producer's clock) to a worker taking the job
      (worker's clock, so skew between hosts shows); ``None`` in process.
    """

    prompt_tokens: int
    completion_tokens: int
    engine_s: float = 0.0
    adapter_load_s: float = 0.0
    queue_wait_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
