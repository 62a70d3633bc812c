"""`python -m sslkit ...` (and `torchrun -m sslkit ...`) runs the CLI; so does the `sslkit` console script
(:func:`run`)."""

import sys


def run() -> None:
    """The CLI. A Ctrl-C while its modules are still importing (the first second) is the one line a Ctrl-C
    gives later (``aborted``, exit 130), not a traceback."""
    try:
        from sslkit.cli import main
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
