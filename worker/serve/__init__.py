"""The queue worker (an arq worker process; never imports torch): its settings from
``LORAFLEET_*``, the ``generate`` job, validation, the stream publisher, aborts, the
heartbeat and registry, the drain, re-runs that continue, the arq compatibility patches,
Redis URLs and outages, logs and metrics.

May import: ``process`` (its torch-free side), ``engine.config`` and ``engine.outputs``,
``model.catalog``, the producer.
"""
