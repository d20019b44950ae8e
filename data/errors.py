"""The one exception type for bad user input (config, paths, files). Command lines turn it into
one line on stderr and exit code 2. Imports nothing from this project."""


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""
