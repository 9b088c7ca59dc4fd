"""The benchmark: a grid runner (``grid.run_bench``) and a leaderboard writer (``leaderboard.write_leaderboard``).

``zsad bench experiments/bench/default.yaml`` expands methods × protocols × seeds into runs, trains and evaluates
each run that has no ``metrics.json`` yet, and writes ``results/leaderboard.{md,csv,html}`` plus plots.
The leaderboard side needs no torch: it reads ``metrics.json`` files and gallery ``.npz`` files only.
"""
