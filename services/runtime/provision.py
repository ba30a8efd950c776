"""Idempotent provisioning: the event stream, KV buckets and one durable consumer per stage.

Names are stable so operators can use the plain `nats` CLI, e.g.
`nats consumer pause TILEPIPE convert 1h` or `nats stream view TILEPIPE`.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from messages.subjects import REDO, event_filter, stream_subjects
from services.core.config import NatsSettings, StageSettings
from services.runtime.stage import Stage

# KV buckets: acquisitions known to the pipeline, and per-stage bookkeeping (e.g. stitch lattice).
KV_BUCKETS = {
    "tp-acquisitions": "acquisition id -> manifest path and state",
    "tp-lattice": "per slice/mosaic bookkeeping of processed tiles (stitch, register)",
    "tp-holds": "acquisition id -> on hold in every stage (tilepipe pause --acq)",
}


def stream_config(settings: NatsSettings) -> StreamConfig:
    """The event log: limits retention on file storage, so it doubles as the replay source.

    Bounded (`max_bytes`, `max_msg_size`, `max_msgs_per_subject`): when full it refuses new
    events rather than dropping old ones, so no publisher can flood the log away; a subject
    keeps its newest `max_msgs_per_subject` messages (e.g. one tile's attempt records)."""
    return StreamConfig(
        name=settings.stream,
        description="tilepipe events (the event log and replay source)",
        subjects=stream_subjects(),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=settings.max_age_days * 86400.0 if settings.max_age_days else None,
        max_bytes=settings.max_bytes,
        max_msg_size=settings.max_msg_size,
        max_msgs_per_subject=settings.max_msgs_per_subject,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
        allow_direct=True,
    )


def consumer_config(name: str, stage: type[Stage], settings: StageSettings) -> ConsumerConfig:
    """The durable pull consumer of a stage.

    Retries after a handler error are negative acks with the configured backoff (the consumer's
    own `backoff` would shorten `ack_wait` on the first delivery). The server allows one
    delivery beyond `max_deliver` so a message whose worker crashed on its last attempt still
    reaches the runtime, which then records it as failed instead of dropping it silently.
    """
    filters = [event_filter(kind.kind) for kind in stage.consumes]
    filters.append(event_filter(f"{REDO}{name}"))  # targeted replays and retries
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"tilepipe stage {name}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver + 1,
        filter_subjects=filters,
        max_ack_pending=settings.concurrency * settings.workers,
        metadata={"tilepipe_stage": name},
    )


async def ensure_stream(js: JetStreamContext, settings: NatsSettings) -> StreamInfo:
    """Create the stream, or bring an existing one to the configured settings."""
    config = stream_config(settings)
    try:
        await js.stream_info(settings.stream)
    except NotFoundError:
        return await js.add_stream(config)
    return await js.update_stream(config)


async def ensure_kv(js: JetStreamContext, settings: NatsSettings | None = None) -> list[str]:
    """Create the KV buckets, or bring existing ones to the configured limits (`kv_max_bytes`,
    `kv_max_value_size`, `kv_history`; full, a bucket refuses writes)."""
    settings = settings or NatsSettings()
    for bucket, description in KV_BUCKETS.items():
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    description=description,
                    history=settings.kv_history,
                    max_bytes=settings.kv_max_bytes,
                    max_value_size=settings.kv_max_value_size,
                    storage=StorageType.FILE,
                    replicas=settings.replicas,
                )
            )
            continue
        info = await js.stream_info(f"KV_{bucket}")
        limits = {
            "max_bytes": settings.kv_max_bytes,
            "max_msg_size": settings.kv_max_value_size,
            "max_msgs_per_subject": settings.kv_history,
        }
        if any(getattr(info.config, key) != value for key, value in limits.items()):
            await js.update_stream(info.config.evolve(**limits))
    return list(KV_BUCKETS)


async def ensure_consumer(
    js: JetStreamContext, stream: str, name: str, stage: type[Stage], settings: StageSettings
) -> ConsumerInfo:
    """Create or update (same name: the server updates the editable fields) a stage's consumer."""
    return await js.add_consumer(stream, consumer_config(name, stage, settings))
