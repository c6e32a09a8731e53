"""Metrics and evaluation reports for the downstream tasks."""
