"""Typed errors. Rejected rows are data (reject records), not exceptions."""


class ChannelgraphError(Exception):
    """Root of every error channelgraph raises on purpose; the CLI prints it as one line."""


class DatasetError(ChannelgraphError):
    """A dataset (file or folder) cannot be read at all. The message is one line: parsers'
    messages quoting the bad input (lxml's, Arrow's) carry its line breaks, which collapse."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class StoreError(ChannelgraphError):
    """The store cannot be opened, read or written."""


class NotFound(ChannelgraphError):
    """A code, party or other named thing does not exist in the store."""
