"""Studies: several runs planned, trained and compared as one measurement.

Neither one run (`pipeline.train`, `pipeline.runner`) nor reading finished runs (`pipeline.report`), nor a Ray
Tune search (`tune/`): a study decides which runs a question needs, trains the missing ones in this process, and
compares them.

    branches.py  WSD decay branches: baselines of several lengths for about the price of the longest one; the
                 plan (branch points, checkpoint cadence), the branch folders, and `train_branches` for a finished
                 long baseline run (what `tst train-branches` runs)
    speedup.py   the iso-loss speedup of one TST run over a ladder of fully-decayed baselines at equal FLOPs per
                 step (bench/speedup.py is its command line; the crossover study of issue 19 builds on it)
    pair.py      measured runs on a token store folder (FSDP2 on one rank, no checkpoint writes) and the figures
                 of an equal-FLOPs pair of them from their logged records (bench/gpu_check.py's train and compare)
    overhead.py  what Ray costs a user: the tiny run's start-up (clock and busy CPU-seconds) and steady steps/s,
                 plain loop against the Ray path, each a real `tst train` (bench/overhead.py is its command line)

Every module here imports only the standard library at import time; each function imports what it uses (the
Ray-free loop, torch), so a torch-only GPU machine can run them on a token store folder.
"""
