"""semivss.inference."""
