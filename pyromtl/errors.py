"""The trainer's exceptions (raised by :mod:`pyromtl.train` and :mod:`pyromtl.distributed`)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite, or a process of the run died).

    Raised by the trainer when the loss is NaN or infinite before the first step, or at a step
    (then naming it, and the last checkpoint if there is one), and, on several processes, by
    :func:`pyromtl.distributed.launch` when a process dies or fails (saying where the same command
    resumes). It reaches the caller of :func:`pyromtl.fit`; the command line reports it and
    exits with status 1.

    Args:
        message: what went wrong and what to try; the only thing it carries (``str(err)``).
    """


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says truthfully where a rerun resumes.

    Raised by the trainer in place of the :class:`KeyboardInterrupt` (after saving a checkpoint
    where the state is consistent), and by :func:`pyromtl.distributed.launch` when Ctrl-C
    reaches its processes. A :class:`KeyboardInterrupt`, so ``except Exception`` lets it through;
    the command line reports it and exits with status 130.

    Args:
        message: the step interrupted and whether a rerun resumes from a checkpoint (and which)
            or starts over; the only thing it carries (``str(err)``).
    """
