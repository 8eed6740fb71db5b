"""The policy language: models, the loader and its positioned YAML, the JSON Schema."""
