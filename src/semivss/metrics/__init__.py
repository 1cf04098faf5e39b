"""semivss.metrics."""
