"""Command line shells over the Python API. Nothing in the package imports this subpackage."""
