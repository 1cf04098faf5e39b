"""semivss.data."""
