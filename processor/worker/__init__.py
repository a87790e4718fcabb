"""The faust worker: stage 1 (per source partition) and stage 2 (per agent)."""
