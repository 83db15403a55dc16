"""The project's Kafka clients for reading and writing the stream topics (recommendations, ...):
each wraps a kafka-python client and speaks in the message contracts, so callers handle
``linrec_stream.contracts`` objects, never raw records or consumer options.

A layer of its own, above ``contracts`` and ``settings`` (the only project modules it imports)
and below everything else, so the command line, the quickstart and the tools above them share one
way to read a topic.
"""
