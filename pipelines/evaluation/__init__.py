"""Evaluation: metrics of scores against labels, and the HTML report of an evaluate run."""
