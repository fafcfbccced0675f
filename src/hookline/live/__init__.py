"""What happens now, below the durable store: the live hub (committed events and streamed text
to this process's streams), in-process wake-ups by topic (:mod:`~hookline.live.notify`), and
their crossing between processes (:mod:`~hookline.live.broadcast` over PostgreSQL LISTEN/NOTIFY,
:mod:`~hookline.live.relay` over Unix sockets for processes sharing a SQLite file). The queue
publishes into it, so it sits below the queue and imports nothing above the domain."""
