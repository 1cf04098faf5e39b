"""semivss.engine."""
