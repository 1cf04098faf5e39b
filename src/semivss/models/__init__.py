"""semivss.models."""
