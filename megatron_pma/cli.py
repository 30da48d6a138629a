"""`megatron-pma` command line (being built)."""
def main(argv=None):
    raise SystemExit("not yet")
