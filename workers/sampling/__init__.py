"""Sampling from a base and its adapters (issue 21): the loop, the adapter cache, the actor."""
