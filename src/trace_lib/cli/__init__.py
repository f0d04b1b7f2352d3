"""The ``trace`` command line: one module per command, each a thin layer over the Python API."""

from trace_lib.cli.app import app, main

__all__ = ["app", "main"]
