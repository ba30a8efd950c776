"""Standing a pipeline up: the config a command names, and the stream, KV buckets and
consumers every stage needs (`tilepipe init`, and `tilepipe up` before it starts services)."""

from __future__ import annotations

import argparse

from services.core.config import Config, load_config
from services.runtime.bus import connect
from services.runtime.provision import ensure_consumer, ensure_kv, ensure_stream
from services.stages import check_options, configured_stages, stage_for, stage_settings


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by `--config`, with `--nats-url` over its server URL when given; every
    stage's options checked (a typo fails here, at start, with the key's name)."""
    config = load_config(args.config)
    check_options(config)
    if getattr(args, "nats_url", None):
        config = config.model_copy(
            update={"nats": config.nats.model_copy(update={"url": args.nats_url})}
        )
    return config


async def provision(config: Config, stages: list[str] | None = None) -> list[str]:
    """Create or update the stream, KV buckets and consumers; returns a report."""
    nc = await connect(config.nats, name="tilepipe-init", retry_for_s=10)
    try:
        js = nc.jetstream()
        info = await ensure_stream(js, config.nats)
        report = [f"stream {info.config.name}: subjects {', '.join(info.config.subjects or [])}"]
        for bucket in await ensure_kv(js, config.nats):
            report.append(f"kv {bucket}")
        for name in stages if stages is not None else configured_stages(config):
            settings = stage_settings(config, name)
            ci = await ensure_consumer(
                js, config.nats.stream, name, stage_for(config, name), settings
            )
            filters = ci.config.filter_subjects or [ci.config.filter_subject]
            report.append(
                f"consumer {ci.name}: {', '.join(f for f in filters if f)} "
                f"(max_ack_pending {ci.config.max_ack_pending}, ack_wait {ci.config.ack_wait}s, "
                f"max_deliver {ci.config.max_deliver})"
            )
        return report
    finally:
        await nc.close()
