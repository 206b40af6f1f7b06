"""Evaluation: exact whole-split scores from a confusion matrix, the ISBI 2012 challenge metrics
and distance metrics."""
