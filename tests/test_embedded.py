"""The session's real servers: Valkey answers commands, the broker carries messages."""

from __future__ import annotations

import uuid

import pulsar
import valkey


def test_valkey_fixture_is_a_real_server(valkey_url: str) -> None:
    client = valkey.Valkey.from_url(valkey_url)
    try:
        assert client.ping()
        info: dict[str, object] = client.info("server")  # type: ignore[assignment]
        assert "valkey_version" in info
        assert client.eval("return redis.call('TIME')[1]", 0)
    finally:
        client.close()  # type: ignore[no-untyped-call]


def test_pulsar_fixture_carries_messages_with_the_official_client(pulsar_url: str) -> None:
    topic = f"persistent://public/default/embedded-{uuid.uuid4().hex}"
    client = pulsar.Client(pulsar_url)
    try:
        consumer = client.subscribe(topic, "test")
        producer = client.create_producer(topic)
        producer.send(b"hello", properties={"event_id": "e1"})
        message = consumer.receive(timeout_millis=5000)
        assert message.data() == b"hello"
        assert message.properties() == {"event_id": "e1"}
        consumer.acknowledge(message)
    finally:
        client.close()
