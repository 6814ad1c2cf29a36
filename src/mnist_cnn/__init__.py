"""mnist-cnn: the classic MNIST CNN tutorial grown into a tool you can trust."""

__version__ = "0.1.0"


class MnistCnnError(Exception):
    """A problem the user can fix (bad path, corrupt file, invalid value).

    The CLI prints its message as one line on stderr and exits with status 2,
    so the message must say what is wrong and, where possible, what to do.
    """
