"""Evaluation: greedy scoring with bootstrap intervals, promotion gates, the report and its plots (layer 5)."""
