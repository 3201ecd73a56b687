"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a traceback."""


class TSTError(RuntimeError):
    """An error a user can act on (bad input, unreachable service, impossible config)."""


class DataError(TSTError):
    """Missing, corrupt, empty or too-small corpus."""


class NonFiniteLossError(TSTError):
    """Loss or gradient norm became NaN/inf; the run stops (never retried by FailureConfig)."""


class TrackingError(TSTError):
    """MLflow tracking server unreachable at start."""
