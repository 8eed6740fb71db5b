"""Backends behind narrow protocols: Valkey for state, Pulsar for events."""
