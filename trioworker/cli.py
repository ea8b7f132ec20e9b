"""The trioworker command."""
def main() -> None:
    raise SystemExit("not yet")
