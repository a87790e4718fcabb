"""Adapters that write out of the processor: Phoenix (spans) and MLflow (rollups)."""
