"""Placeholder: the events step lands here."""
