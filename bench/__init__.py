"""Benchmarks of fastapi_once against its peers: ``python -m bench`` (``--help`` for options)."""
