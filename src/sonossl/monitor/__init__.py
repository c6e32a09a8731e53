"""Monitoring: image statistics and reference data for drift reports."""
