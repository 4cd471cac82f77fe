"""`python -m megaloom` runs the CLI."""

from megaloom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
