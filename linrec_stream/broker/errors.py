class KafkaSetupError(RuntimeError):
    """The local broker cannot be fetched, started or reached. The message is one line,
    optionally followed by the tail of a log (``detail``) for the user to read."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail
