"""Evaluation: role-play metrics with bootstrap intervals, and the comparison report."""
