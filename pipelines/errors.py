"""The errors adpipe shows to users, each with the process exit code it maps to.

The CLI turns these into one clear line on stderr; anything else is a bug and exits 1 with the
traceback kept in the run record, not printed at the user.
"""

from __future__ import annotations


class AdpipeError(Exception):
    """Base class: a problem adpipe can explain in one sentence."""

    exit_code = 1


class SpecError(AdpipeError):
    """A job spec is invalid. `field` is the dotted path of the offending key (e.g. `steps[1].outputs`)."""

    exit_code = 2

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class InputError(AdpipeError):
    """Input data or a referenced location is missing or unusable (exit code 2, like a bad spec)."""

    exit_code = 2


class StorageError(AdpipeError):
    """Object storage refused or failed an operation (unreachable endpoint, credentials, missing
    bucket): an infrastructure failure (exit 1), not bad input; the same command may work later."""

    exit_code = 1


class JobFailed(AdpipeError):
    """A job ran and failed."""

    exit_code = 1


class RunInterrupted(BaseException):
    """Raised in the driver by SIGTERM (`orchestrator.raise_on_sigterm`): a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it (exit 143)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
