"""Evaluation: sampling over step counts, grading, aggregation and reports."""
