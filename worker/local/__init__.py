"""Running lorafleet on one machine: a worker as a child process (``launcher``) and a local
fleet (an embedded Redis and workers) for the CLI, tests and benchmarks.

May import: ``serve`` (settings), ``model.catalog``, the producer. Never torch.
"""
