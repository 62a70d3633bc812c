"""`python -m sslkit ...` (and `torchrun -m sslkit ...`) runs the CLI."""

from sslkit.cli import main

if __name__ == "__main__":
    main()
