"""Every use of a private Ray API in tst, in one place (checked against Ray 2.60.0, the version pyproject pins).

Each function says what it relies on and what is lost if Ray moves it: all of them only change what the console
shows or re-read a setting, so a failure here is caught and costs verbosity, never correctness. When upgrading
Ray, check each `from ray... import` below still resolves (tests/test_cli.py exercises all of them through a quiet
`tst train`); prefer a public API as soon as one does the job.
"""

from __future__ import annotations

import logging
import sys


def refresh_ray_config() -> None:
    """Re-read Ray's C++-side config (RAY_AUTH_MODE among it), which Ray caches when imported.

    Relies on `ray._raylet.Config.initialize("")`, the call Ray itself makes when it turns token auth on by default
    (`ray._private.authentication.authentication_token_setup._enable_token_auth`). No public API re-reads it.
    If it fails, `ray.init` uses the mode read at import time."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001
        pass


def reconfigure_ray_data_logging() -> None:
    """Apply RAY_DATA_LOGGING_CONFIG again when `ray.data` was imported before it was set.

    Relies on `ray.data._internal.logging.configure_logging()` (Ray Data reads the variable only at import; the
    public `ray.data` has no re-configure call). If it fails, only the driver's console is louder."""
    if "ray.data" not in sys.modules:
        return
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()
    except Exception:  # noqa: BLE001
        pass


def set_train_report_log_level(level: str) -> None:
    """Ray Train 2.60 logs every `ray.train.report` at INFO on a logger named after its own file
    (`ray/train/v2/_internal/execution/context.py`), which `ray.train.LoggingConfig` does not reach.

    Relies on that module's path. If it moves, the per-report INFO lines come back; nothing else changes."""
    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(level.upper())
    except Exception:  # noqa: BLE001
        pass


def set_search_properties_compat(set_search_properties, metric, mode, config, **spec) -> bool:
    """Forward `Searcher.set_search_properties` to a wrapped searcher the way Tune does for its own wrappers
    (`ray.tune.search.util._set_search_properties_backwards_compatible`, which accepts searchers written before
    the `**spec` argument existed). Falls back to the modern signature if Tune drops the helper.

    Used by `tune.schedule.BaselineFirst`, which stays instead of Tune's public `points_to_evaluate` (its
    docstring says why: checked against Ray 2.60.0 and Optuna 5.0.0)."""
    try:
        from ray.tune.search.util import _set_search_properties_backwards_compatible as compat
    except ImportError:
        return set_search_properties(metric, mode, config, **spec)
    return compat(set_search_properties, metric, mode, config, **spec)
