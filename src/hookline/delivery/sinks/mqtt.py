"""MQTT (``aiomqtt``): a QoS 1 publish to the topic ``target``, acknowledged (PUBACK) before it
counts; on MQTT 5 the headers go as user properties. ``url`` is ``mqtt://[user:password@]host[:port]``
(``mqtts://`` for TLS)."""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import Any

from hookline.delivery.sinks.base import Sink, SinkMessage, require


class MqttSink(Sink):
    _client: Any = None

    async def _connect(self) -> Any:
        async with self.connecting:
            if self._client is None:
                await self._open()
        return self._client

    async def _open(self) -> None:
        aiomqtt = require("aiomqtt", "mqtt")
        parts = urllib.parse.urlsplit(self.config.url)
        tls = parts.scheme == "mqtts"
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.config.timeout_seconds,
            tls_params=aiomqtt.TLSParameters() if tls else None,
        )
        # The sender bounds the publishes in flight (max_in_flight); aiomqtt's own warning, past
        # 10 awaiting their PUBACK, would log on every busy second.
        client.pending_calls_threshold = 1024
        await client.__aenter__()
        self._client = client

    async def publish(self, message: SinkMessage) -> None:
        properties_module = require("paho.mqtt.properties", "mqtt")
        packettypes = require("paho.mqtt.packettypes", "mqtt")
        client = self._client or await self._connect()
        properties = properties_module.Properties(packettypes.PacketTypes.PUBLISH)
        properties.ContentType = message.headers.get("content-type", "application/json")
        properties.UserProperty = [
            (k, v) for k, v in message.headers.items() if k != "content-type"
        ]
        await client.publish(
            self.config.target, message.body, qos=1, properties=properties,
            timeout=self.config.timeout_seconds,
        )  # fmt: skip

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # already gone with its broker
                await client.__aexit__(None, None, None)
