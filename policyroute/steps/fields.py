"""Placeholder: the fields step lands here."""
