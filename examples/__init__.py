"""Runnable end-to-end examples for labelwatch."""
