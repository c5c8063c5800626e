"""Evaluation of dual encoders: zero-shot classification, retrieval, synthetic suites, reports.

* :mod:`~imagefm.eval.templates` — prompt templates per language (Korean particles chosen per name)
* :mod:`~imagefm.eval.metrics` — top-k / per-class accuracy, confusion, recall@K (ties pessimistic)
* :mod:`~imagefm.eval.zeroshot` — ``evaluate_zeroshot`` on labelled images or records
* :mod:`~imagefm.eval.retrieval` — ``retrieval_metrics`` and ``evaluate_retrieval`` (R@1/5/10)
* :mod:`~imagefm.eval.suites` — ``SUITES`` and ``run_suite``: synthetic compositional probes
* :mod:`~imagefm.eval.report` — ``write_report`` (JSON, Markdown, PNG plots), ``format_table``

Submodules are imported explicitly (nothing is re-exported here) so that importing the templates
from :mod:`imagefm.apps.zeroshot` does not pull in the rest of evaluation.
"""
