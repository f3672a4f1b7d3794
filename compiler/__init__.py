"""iia compiler."""
