"""Evaluation harness: metrics, statistics, baselines, candidates, the runner and reports.

Submodules are imported on use so that ``persona4rec --help`` stays fast; import
what you need, e.g. ``from persona4rec.evaluation.metrics import ranking_metrics``.
"""
