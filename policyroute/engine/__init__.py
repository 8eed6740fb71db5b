"""The engine of one app: policies, compiled chains, services, and what attaches to it."""
