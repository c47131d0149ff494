"""One exception family, so notebooks can catch workbench mistakes without
catching library internals, and every message says what to do next."""


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on bad input or state."""


class ModelLoadError(WorkbenchError):
    """A model could not be found or built."""


class InputError(WorkbenchError, ValueError):
    """A prompt, task or argument is unusable as given."""


class IncompatibleArtifactError(WorkbenchError):
    """A saved control or controller belongs to another model or format."""


class NumericalError(WorkbenchError):
    """A gradient or score became NaN or infinite."""
