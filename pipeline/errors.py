"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a traceback."""


class TSTError(RuntimeError):
    """An error a user can act on (bad input, unreachable service, impossible config)."""


class DataError(TSTError):
    """Missing, corrupt, empty or too-small corpus."""


class NonFiniteLossError(TSTError):
    """Loss or gradient norm became NaN/inf; the run stops (never retried by FailureConfig)."""


class TrackingError(TSTError):
    """MLflow tracking server unreachable at start."""


class FatalWorkerError(TSTError):
    """A worker failed on something a restart would only repeat (a config or data error, a bug): the run ends
    once, with the worker's one line, instead of being retried up to scaling.max_failures times. `worker_error`
    is the worker's own exception (the driver raises that when it is one of ours)."""

    def __init__(self, message: str, worker_error: "BaseException | None" = None):
        super().__init__(message)
        self.worker_error = worker_error

    def __reduce__(self):  # crosses process boundaries inside Ray's ControllerError
        return (self.__class__, (str(self), self.worker_error))


# Errors that come back on every retry. A RuntimeError that is not ours (a collective aborted by a dead peer, a
# lost node's socket, an out-of-memory) is infrastructure and retried; these are not.
DETERMINISTIC = (TSTError, ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError,
                 NotImplementedError, ZeroDivisionError, ImportError, SyntaxError)


def is_deterministic(exc: BaseException) -> bool:
    """True for an error that a restart from the last checkpoint would raise again."""
    return isinstance(exc, DETERMINISTIC)
