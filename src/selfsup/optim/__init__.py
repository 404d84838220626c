"""Optimisers and schedules in plain torch."""
