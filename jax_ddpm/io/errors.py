"""Errors a user can fix: a bad config value or a bad input file.

Each message names the config key or flag and the file. `main.py` ends the process with the
message alone for these (no traceback: nothing is wrong with the program), and they are raised
before anything compiles or anything in the workdir changes. They subclass ValueError, so code
that already catches ValueError keeps working.
"""


class UserInputError(ValueError):
  """Something the user gave (config value, flag, file) cannot be used; the message says why."""


class ConfigError(UserInputError):
  """A config key holds a value the run cannot use."""


class InputFileError(UserInputError):
  """A file or directory the user named is missing, empty, damaged or of the wrong kind."""


class MissingInputError(InputFileError, FileNotFoundError):
  """A file or directory the user named does not exist."""


class UnreadableCheckpointError(InputFileError):
  """A checkpoint's files in the workdir are damaged or missing."""
