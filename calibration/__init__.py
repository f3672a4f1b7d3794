"""iia calibration."""
