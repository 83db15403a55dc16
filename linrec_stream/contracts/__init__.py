"""Message contracts of the stream (format version 1) and the catalogue of topics.

Below everything but the settings: workers, the lifecycle, the command line and the tests
encode and decode messages only through these types.
"""
