"""ddsuite.cli: the `ddsuite` command line."""
