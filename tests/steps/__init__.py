"""Tests of the steps, one module per policy key."""
