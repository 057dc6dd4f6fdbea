"""The one exception type for mistakes a user can fix; scripts print its message without a traceback."""


class UserError(Exception):
    """A problem with the user's files, data or settings, with a message saying what to do."""


def run_main(main, *args) -> None:
    """Run a script's main; a UserError becomes its message on stderr and exit status 2, not a traceback."""
    import sys

    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
