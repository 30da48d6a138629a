"""CLI subcommands of the merge engine."""
