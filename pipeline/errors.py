"""The error type for problems the user can fix (bad input, config, conflicting outputs): the CLI
prints these as one line and exits 2, instead of a traceback."""


class MomaError(Exception):
    pass
