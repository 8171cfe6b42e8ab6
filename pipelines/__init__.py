"""adpipe: industrial visual anomaly detection as batch jobs on Ray."""

__version__ = "0.1.0"
