"""User-facing errors. Messages always name the offending file or config key."""


class SemivssError(ValueError):
    """Base class of errors caused by user input."""


class DataError(SemivssError):
    """Bad data on disk: missing/corrupt frame, size mismatch, label out of range, empty split."""


class ConfigError(SemivssError):
    """Bad configuration: unknown key, wrong type, inconsistent settings."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TrainingInterrupted(TrainingError):
    """SIGINT / SIGTERM during training: ``last.pt`` was written at the current step."""
