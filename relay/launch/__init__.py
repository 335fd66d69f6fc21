"""Launch layer."""
