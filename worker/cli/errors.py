"""Which exceptions are a user's mistake: the command prints their message as one line.

The types are looked up only when something went wrong, so building the parser imports
none of the modules that define them.
"""

from __future__ import annotations


class UsageError(Exception):
    """A command's own refusal of what it was given (the message says what to type)."""


def is_user_error(error: BaseException) -> bool:
    """A refusal with a message meant for the user: bad flags or variables, a Redis that
    cannot be reached, a request error, a local worker or model that cannot start, a result
    not there in time (``TimeoutError``, whose message names the job)."""
    from lorafleet.producer.errors import LoraFleetError
    from lorafleet.worker.local.launcher import WorkerStartError
    from lorafleet.worker.model.catalog import ModelPrepareError
    from lorafleet.worker.serve.settings import ConfigError

    return isinstance(
        error,
        UsageError
        | ConfigError
        | LoraFleetError
        | ModelPrepareError
        | WorkerStartError
        | TimeoutError,
    )
