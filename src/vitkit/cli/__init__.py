"""The `vitkit` command line (see vitkit.cli.main)."""
