"""`tst tune`: a Ray Tune search over TST settings (switch fraction r, bag size s, optionally lr and the
slot-weight scheme) at equal FLOPs, tracked in MLflow and printed like the paper's Tables 4-7.

- `tune.search`: the search spec (YAML or CLI flags), trial points, the trainable, the driver (`run_search`).
- `tune.report`: the (s, r) table, the results CSV, the heatmap and best-vs-baseline curves.
- `tune.cli`: `register(subparsers)` for `tst tune`.

Importing this package imports nothing heavy; Ray and MLflow are imported where they are used.
"""
