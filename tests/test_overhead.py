"""pipeline.study.overhead: the figures bench/overhead.py prints (steady steps/s, start-up's busy CPU-seconds)."""

import math
import sys
import time

import pytest

from pipeline.study.overhead import BusySampler, busy_cpu_s, steady_rate


def test_steady_rate_counts_from_the_first_step_after_warmup_to_the_last():
    recs = [{"step": s, "elapsed_s": 0.5 * s} for s in (5, 10, 15, 20, 25, 30)] + [{"step": 30, "kind": "final"}]
    recs[4]["elapsed_s"] = 12.0  # step 25 came late: the rate runs from step 20 (10 s) to step 30 (15 s)
    assert steady_rate(recs, warmup=18) == pytest.approx(10 / 5.0)


def test_sampler_interpolates_between_samples():
    s = BusySampler()
    s.samples = [(100.0, 10.0), (101.0, 12.0), (103.0, 13.0)]
    assert s.at(100.5) == pytest.approx(11.0)
    assert s.at(102.0) == pytest.approx(12.5)
    assert s.at(99.0) == 10.0 and s.at(104.0) == 13.0  # outside the samples: the nearest one
    assert s.between(100.5, 102.0) == pytest.approx(1.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_sampler_charges_a_busy_loop_its_cpu():
    assert math.isfinite(busy_cpu_s())
    with BusySampler(every=0.05) as s:
        t0 = time.time()
        while time.time() - t0 < 0.6:  # one core busy for 0.6 s
            pass
        t1 = time.time()
    assert len(s.samples) >= 8
    assert s.between(t0, t1) >= 0.45  # machine-wide: other processes can only add to it


def test_process_labels_name_rays_parts():
    from pipeline.study.overhead import process_label

    site = "/v/lib/python3.11/site-packages/ray"
    assert process_label("ray::RayTrainWorker.train_fn") == "ray::RayTrainWorker"
    assert process_label(f"{site}/core/src/ray/raylet/raylet --node_id=1") == "raylet"
    assert process_label(f"/v/bin/python {site}/dashboard/agent.py --x") == "dashboard/agent.py"
    assert process_label(f"/v/bin/python -u {site}/_private/runtime_env/agent/main.py") == \
        "_private/runtime_env/agent/main.py"
    assert process_label("/v/bin/python3.11 /v/bin/tst train --name x") == "tst train"
    assert process_label("") == "?"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_process_sampler_charges_a_child_process_its_cpu():
    import subprocess

    from pipeline.study.overhead import ProcessSampler

    spin = "import time\nt = time.time()\nwhile time.time() - t < 0.8: pass\ntime.sleep(0.6)"
    with ProcessSampler(every=0.1) as s:
        proc = subprocess.Popen([sys.executable, "-c", spin])
        proc.wait()
        t1 = time.time()
    by = s.by_process(t1)
    mine = by.get(f"{sys.executable.rsplit('/', 1)[-1]} -c", 0.0)
    assert 0.6 <= mine <= 2.0, by  # its 0.8 s of spinning (plus its start), seen before it exited
