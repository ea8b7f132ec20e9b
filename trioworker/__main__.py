"""``python -m trioworker``: the ``trioworker`` command (:func:`trioworker.cli.main`)."""

from trioworker.cli import main

if __name__ == "__main__":
    main()
