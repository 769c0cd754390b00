"""relaygw's benchmark harness (python -m bench.run)."""
