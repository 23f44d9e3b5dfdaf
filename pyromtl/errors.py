"""The trainer's exceptions (raised by :mod:`pyromtl.train` and :mod:`pyromtl.distributed`)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite, or a process of the run died)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says truthfully where a rerun resumes."""
