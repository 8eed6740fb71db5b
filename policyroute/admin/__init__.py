"""Operator actions on live state: credits and cached responses."""
