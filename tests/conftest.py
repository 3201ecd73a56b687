"""Shared test fixtures.

One local Ray instance serves the whole test session (design notes: starting Ray costs seconds, and two
1-CPU workers on a 2-core machine starve Ray Data), started with 4 logical CPUs so that fractional-CPU train
workers and the Ray Data actors fit together on 2 real cores.
"""

import os

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
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls; without it the
        # cleaner can mistake a live controller for a dead one and remove a running trial's placement group.
        from pipeline.ray_env import free_ports

        (port,) = free_ports(1)
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=False, configure_logging=False)
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
