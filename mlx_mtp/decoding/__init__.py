"""Lossless speculative decoding: draft sources (masks, prompt lookup, datastore) verified by the base model."""
