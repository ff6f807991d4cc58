"""The shipped run configs (`jobs/configs/*.yaml`), importable as package data."""
