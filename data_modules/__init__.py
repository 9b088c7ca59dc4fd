"""The shared data layer."""
