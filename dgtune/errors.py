"""The errors a user can fix. The command-line entry points (`dgtune.validate.cli_errors`) print each as one line
`dgtune: error: ...` and exit with code 2; anything else is a bug and keeps its traceback. This module imports
nothing from dgtune, so every other module can raise these without an import circle."""


class DgtuneError(Exception):
    """Base of the errors a user can fix (shown as one line by the command-line entry points)."""


class ConfigError(DgtuneError, ValueError):
    """A config key has a wrong type or an impossible value, or is ignored by the chosen options."""


class InputError(DgtuneError, ValueError):
    """An input file (test file, data file, model folder) is unusable."""


class NonFiniteError(DgtuneError, RuntimeError):
    """Training produced a non-finite loss or gradient (or weights)."""


class RunLockedError(DgtuneError, RuntimeError):
    """Another live process holds the run folder's lock."""


class CheckpointError(DgtuneError, FileNotFoundError):
    """No complete and loadable checkpoint to resume from."""


class SaveError(DgtuneError, OSError):
    """Writing a checkpoint or the final weights failed (disk full, ...); earlier files are untouched."""


class ModelNotAvailableError(DgtuneError, RuntimeError):
    """The requested weights are neither local nor reachable."""


class SudokuFormatError(DgtuneError, ValueError):
    """A malformed Sudoku grid or CSV file (the message names the file, line and reason)."""


class VerifierError(DgtuneError, ValueError):
    """A task's verifier raised, or returned something other than grades in [0, 1] (the message names the verifier
    and the row); `eval.on_verifier_error=count` counts such rows as wrong instead of stopping."""
