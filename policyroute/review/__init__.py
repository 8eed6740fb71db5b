"""Reading policies without serving them: lint, explain, diff, dry runs and policy tests."""
