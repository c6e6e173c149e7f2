"""Training components, one concern each."""
