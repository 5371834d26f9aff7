"""The `cdlm` command line: one file per subcommand, thin over the Python API."""
