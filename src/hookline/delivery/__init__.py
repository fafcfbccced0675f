"""Getting a job's events to whoever wants them: webhooks (:mod:`~hookline.delivery.webhooks`:
signing, the sender working through the outbox, SSRF protection) and streams
(:mod:`~hookline.delivery.streams`: SSE and WebSocket cursors over the event log and the live
hub), and data sinks (:mod:`~hookline.delivery.sinks`: Redis, NATS, AMQP, MQTT, PostgreSQL,
JSONL), fed from the same outbox by the webhook sender."""
