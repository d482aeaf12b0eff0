"""`make bench`: throughput and latency figures, each beside its reference measured in the same run."""
