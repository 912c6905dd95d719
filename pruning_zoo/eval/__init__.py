"""Evaluation: suites, the sweep over strategies x budgets x tasks through lmms-eval, and the result store."""
