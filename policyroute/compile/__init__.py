"""From a merged route policy to an immutable chain of steps."""
