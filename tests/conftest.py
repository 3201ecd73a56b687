"""Shared test fixtures.

One local Ray instance serves the whole test session (design notes: starting Ray costs seconds, and two
1-CPU workers on a 2-core machine starve Ray Data), started with 4 logical CPUs so that fractional-CPU train
workers and the Ray Data actors fit together on 2 real cores.
"""

import os
import threading

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The session's own local Ray runs without token auth, chosen here before anything imports Ray: `tst` commands
# called in-process (pipeline.cli.main -> pipeline.ray_env.console_defaults) would otherwise set RAY_AUTH_MODE=token
# after Ray read its config, and the session Ray's GCS (token) and this process (disabled) would disagree.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (4 logical CPUs on any machine)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # As `tst` starts a local Ray (its environment; the node label that makes trainers lean: no placement-group
        # cleaner or autoscaling-coordinator actor per run), plus the dashboard: tests read the state API.
        from pipeline.ray_session import start_local_ray

        start_local_ray(4, dashboard=True, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    # left running until the session ends; ray shuts itself down at exit


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is many times faster than two on a shared 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (outputs, MLflow store) per test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the combined chaos run, started in the background ---------------------------------------------------------------
# tests/test_elastic.py checks one elastic run that a child process drives through every fault kind (pipeline/study/
# chaos.py): ~7 minutes, most of it Ray Train restarts. It runs beside the rest of the suite (started by the first
# test after tests/test_autoscale.py, whose autoscaler launched a spare node when the chaos run loaded the machine
# during its scale-up), and its tests run last. Nothing of it is shared with the other tests: its own Ray cluster
# (own ports and temp dir), mlflow server, token store and TMPDIR. Measured 2026-12-02 (quiet 2-core machine): the
# suite took 1,385 s with the chaos run in line, 1,125 s beside it. Both cores are busy nearly throughout, so the
# suite's time is its total CPU / 2: `python bench/suite_cpu.py -q` says where it goes (2026-12-03: 1,432 CPU-s,
# 820.6 s, after the cuts in docs/results.md "Where the CPU went").
ELASTIC_FILE, AUTOSCALE_FILE = "test_elastic.py", "test_autoscale.py"
_chaos: dict = {}


def pytest_collection_modifyitems(session, config, items):
    # stable sort: the autoscaling test first, the chaos run's tests last, the order within each group kept
    items.sort(key=lambda it: (it.path.name != AUTOSCALE_FILE) + (it.path.name == ELASTIC_FILE))


def pytest_collection_finish(session):
    if any(it.path.name == ELASTIC_FILE for it in session.items):
        _chaos["config"] = session.config


def pytest_runtest_logstart(nodeid, location):
    if "config" in _chaos and "thread" not in _chaos and AUTOSCALE_FILE not in nodeid:
        _start_chaos(_chaos["config"])


def _start_chaos(config) -> None:
    from pipeline.study import chaos

    out = str(config._tmp_path_factory.mktemp("chaos") / "run")
    procs: list = []

    def run():
        try:
            # the prepare writes a shard every 8 s (not the bench's 4 s), so that the run still reads behind its
            # frontier when the driver starts slowly on a loaded machine
            _chaos["result"] = chaos.run_combined(0, out, reference="none", timeout_s=1500,
                                                  check_node_local_store=True, prepare_throttle_s=8.0,
                                                  started=procs)
        except BaseException as e:  # noqa: BLE001 - reported by the test that asks for it
            _chaos["result"] = {"error": f"{type(e).__name__}: {e}"}

    thread = threading.Thread(target=run, name="chaos-run", daemon=True)
    _chaos.update(out=out, thread=thread, procs=procs)
    thread.start()


def pytest_sessionfinish(session, exitstatus):
    """An interrupted or failed session ends the chaos run too (its child's session: cluster, driver, servers)."""
    import signal

    thread = _chaos.get("thread")
    if thread is not None and thread.is_alive():
        for p in _chaos["procs"]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        thread.join(timeout=60)  # run_combined's own cleanup: whatever the child's sessions left


@pytest.fixture(scope="session")
def chaos_background(request):
    """The background chaos run's (out, result): waits for it to end (starts it if no other test ran first)."""
    if "thread" not in _chaos:
        _start_chaos(request.config)
    _chaos["thread"].join()
    return _chaos["out"], _chaos["result"]
