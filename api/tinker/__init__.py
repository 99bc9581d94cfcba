"""The Tinker training API under /api/v1, for the official `tinker` SDK (issue 21)."""
