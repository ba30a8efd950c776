"""Prometheus metrics shared by every stage (labels stay low-cardinality: no tile ids)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

EVENTS_HANDLED = Counter(
    "tilepipe_events_handled_total",
    "Input events handled by a stage, by outcome (ok, retry, failed, invalid).",
    ["stage", "outcome"],
)
EVENTS_INVALID = Counter(
    "tilepipe_events_invalid_total",
    "Input events refused on receipt, by reason.",
    ["stage", "reason"],
)
EVENTS_PUBLISHED = Counter(
    "tilepipe_events_published_total",
    "Events published by a stage, by event kind.",
    ["stage", "event"],
)
EVENTS_DUPLICATE = Counter(
    "tilepipe_events_duplicate_total",
    "Publishes the server dropped as duplicates (Nats-Msg-Id).",
    ["stage"],
)
REDELIVERIES = Counter(
    "tilepipe_redeliveries_total", "Input events received more than once.", ["stage"]
)
HANDLE_SECONDS = Histogram(
    "tilepipe_handle_duration_seconds",
    "Time a stage spends handling one event.",
    ["stage"],
    buckets=DURATION_BUCKETS,
)
IN_FLIGHT = Gauge("tilepipe_in_flight", "Events being handled now.", ["stage"])
BYTES_READ = Counter("tilepipe_read_bytes_total", "Bytes read by a stage.", ["stage"])
BYTES_WRITTEN = Counter("tilepipe_written_bytes_total", "Bytes written by a stage.", ["stage"])
RECONNECTS = Counter(
    "tilepipe_nats_reconnects_total", "Reconnections to NATS after a disconnect.", ["service"]
)
CONSUMER_PENDING = Gauge(
    "tilepipe_consumer_pending_messages",
    "Messages in the stream not yet delivered to the stage's consumer.",
    ["stage"],
)
CONSUMER_ACK_PENDING = Gauge(
    "tilepipe_consumer_ack_pending_messages",
    "Messages delivered to the stage and not yet acknowledged.",
    ["stage"],
)
CONSUMER_REDELIVERED = Gauge(
    "tilepipe_consumer_redelivered_messages",
    "Messages delivered more than once and not yet acknowledged.",
    ["stage"],
)
CONSUMER_PAUSED = Gauge(
    "tilepipe_consumer_paused", "1 while the stage's consumer is paused.", ["stage"]
)

WATCHER_FILES = Counter(
    "tilepipe_watcher_files_total",
    "Files the watcher looked at, by outcome (emitted, duplicate, unmatched, outside_lattice, "
    "temporary).",
    ["outcome"],
)
WATCHER_LATENCY = Histogram(
    "tilepipe_watcher_latency_seconds",
    "From a tile file's last write to its tile_arrived event.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
WATCHER_PENDING = Gauge("tilepipe_watcher_pending_files", "Files seen but not yet complete.")
ACQ_TILES_EXPECTED = Gauge(
    "tilepipe_acquisition_tiles_expected", "Tiles in the lattice of an acquisition.", ["acq"]
)
ACQ_TILES_ARRIVED = Gauge(
    "tilepipe_acquisition_tiles_arrived", "Tiles of an acquisition complete on disk.", ["acq"]
)

TILES_BY_DEVICE = Counter(
    "tilepipe_process_tiles_total", "Tiles processed, by device (cpu, gpu:NAME).", ["device"]
)


def serve_metrics(host: str, port: int) -> int:
    """Expose /metrics on host:port (0 picks a free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
