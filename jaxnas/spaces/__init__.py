"""Search spaces, chosen by name."""
