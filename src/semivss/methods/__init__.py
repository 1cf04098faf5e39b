"""semivss.methods."""
