"""iia runtime."""
