"""jaxlm's configs: `base.py` is the schema with defaults; each other file starts from it."""
