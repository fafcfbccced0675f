"""RabbitMQ and other AMQP 0-9-1 brokers (``aio-pika``): a persistent message with the message id
as ``message_id``, the headers as AMQP headers, published with publisher confirms and
``mandatory`` (a message no queue takes is an error, retried, never dropped). ``target`` is
``exchange/routing-key``, or a routing key alone for the default exchange (a queue's name)."""

from __future__ import annotations

from typing import Any

from hookline.delivery.sinks.base import Sink, SinkMessage, require


class AmqpSink(Sink):
    _connection: Any = None
    _exchange: Any = None

    async def _connect(self) -> Any:
        async with self.connecting:
            if self._exchange is None:
                await self._open()
        return self._exchange

    async def _open(self) -> None:
        aio_pika = require("aio_pika", "amqp")
        self._connection = await aio_pika.connect(
            self.config.url, timeout=self.config.timeout_seconds
        )
        channel = await self._connection.channel(publisher_confirms=True)
        exchange_name, _, _ = self._route()
        if exchange_name:
            self._exchange = await channel.get_exchange(exchange_name, ensure=True)
        else:
            self._exchange = channel.default_exchange

    def _route(self) -> tuple[str, str, str]:
        exchange, slash, key = self.config.target.partition("/")
        return (exchange, slash, key) if slash else ("", "", exchange)

    async def publish(self, message: SinkMessage) -> None:
        aio_pika = require("aio_pika", "amqp")
        exchange = self._exchange or await self._connect()
        headers = {k: v for k, v in message.headers.items() if k != "content-type"}
        amqp_message = aio_pika.Message(
            message.body,
            message_id=message.id,
            headers=headers,
            content_type=message.headers.get("content-type", "application/json"),
            type=message.event_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        confirmed = await exchange.publish(
            amqp_message, routing_key=self._route()[2], mandatory=True,
            timeout=self.config.timeout_seconds,
        )  # fmt: skip
        if getattr(confirmed, "name", "") not in ("Basic.Ack", ""):
            raise RuntimeError(f"the broker did not confirm the message: {confirmed}")

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            await connection.close()
