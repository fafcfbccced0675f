"""Redis Streams (``redis.asyncio``): one ``XADD`` per message to the stream ``target``, its
fields the event's (``id``, ``type``, ``timestamp``, ``job_id``, ``tenant``, ``data``, the whole
``body``) and the signature headers; ``MAXLEN ~ maxlen`` when configured."""

from __future__ import annotations

from typing import Any

from hookline.delivery.sinks.base import Sink, SinkMessage, require


class RedisSink(Sink):
    _client: Any = None

    async def publish(self, message: SinkMessage) -> None:
        if self._client is None:
            redis = require("redis.asyncio", "redis")
            timeout = self.config.timeout_seconds
            self._client = redis.from_url(
                self.config.url, socket_connect_timeout=timeout, socket_timeout=timeout
            )
        fields: dict[str, str | bytes] = {
            "id": message.id,
            "type": message.event_type,
            "timestamp": message.timestamp,
            "job_id": message.job_id or "",
            "tenant": message.tenant,
            "data": message.data_json,
            "body": message.body,
            **message.headers,
        }
        await self._client.xadd(
            self.config.target, fields, maxlen=self.config.maxlen, approximate=True
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
