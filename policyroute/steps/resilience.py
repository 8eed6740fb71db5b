"""Placeholder: the resilience step lands here."""
