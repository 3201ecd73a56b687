"""`tst tune`: a Ray Tune search over TST settings (switch fraction r, bag size s, optionally lr and the
slot-weight scheme) at equal FLOPs, tracked in MLflow and printed like the paper's Tables 4-7.

- `tune.search`: the driver (`run_search`): settle the search, prepare, open the MLflow parent, fit, report.
- `tune.space`: the search spec (YAML or CLI flags), the searched keys, the grid points and trial labels.
- `tune.trial`: the trainable (`tst_trial`), its reports to Tune and its MLflow child run.
- `tune.schedule`: the baseline-first search algorithm and the baseline-keeping ASHA scheduler.
- `tune.resources`: trials at a time and torch threads per trial, from the CPUs and GPUs.
- `tune.report`: the (s, r) table, the results CSV, the heatmap and best-vs-baseline curves.
- `tune.cli`: `register(subparsers)` for `tst tune`.

Importing this package imports nothing heavy; Ray and MLflow are imported where they are used.
"""
