"""Decoding and inference helpers."""
