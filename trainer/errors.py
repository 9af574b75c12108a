"""The one exception type for mistakes the user can fix (config, command line, input data).

`trainer.main` prints its message as one line on stderr and exits with code 2.
"""


class UserError(Exception):
  """An error in what the user asked for or gave, not in the program."""
