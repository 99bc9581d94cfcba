"""The lowest floor, shared by api/, orchestrator/ and workers/: the object store, its key
layout, manifests, the JSONL example formats and the run spec types. Imports neither torch
nor Ray, so an API replica stays light.
"""
