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
NO_SPACE_WAITS = Counter(
    "tilepipe_no_space_waits_total",
    "Handler calls that failed for want of disk space (ENOSPC, EDQUOT); the input is kept and "
    "handled again after a pause, without using up its deliveries.",
    ["stage"],
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
STREAM_USED = Gauge(
    "tilepipe_stream_used_bytes",
    "Bytes stored in a JetStream stream (the event stream, or KV_<bucket>).",
    ["stream"],
)
STREAM_MAX = Gauge(
    "tilepipe_stream_max_bytes",
    "Configured size limit of a JetStream stream; at it new messages are refused.",
    ["stream"],
)

WATCHER_FILES = Counter(
    "tilepipe_watcher_files_total",
    "Files the watcher skipped or announced, by outcome (emitted, duplicate: rewritten after "
    "its event, unmatched, outside_lattice, temporary, sidecar, not_regular, refused: under a "
    "refused acquisition, outside_root, error).",
    ["outcome"],
)
WATCHER_REFUSED = Gauge(
    "tilepipe_watcher_acquisitions_refused",
    "Manifests under the raw root the watcher refuses now (invalid, breaking the event rules, "
    "a duplicate acquisition id); each is logged once as acquisition_refused.",
)
WATCHER_PUBLISH_FAILURES = Counter(
    "tilepipe_watcher_publish_failures_total",
    "Publishes of the watcher that failed (NATS down, stream full); retried with backoff.",
)
WATCHER_STALLED = Gauge(
    "tilepipe_watcher_stalled_files",
    "Tile files below their size that have not grown for watcher.stalled_s (a writer died?).",
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

TEMPORARIES_SWEPT = Counter(
    "tilepipe_temporaries_swept_total",
    "Temporary outputs removed by the sweeper (their writer is gone, or older than "
    "sweep.max_age_s).",
    ["root"],
)

TILES_BY_DEVICE = Counter(
    "tilepipe_process_tiles_total", "Tiles processed, by device (cpu, gpu:NAME).", ["device"]
)


UPLOAD_BYTES = Counter(
    "tilepipe_upload_bytes_total",
    "Bytes sent to object storage (rate() of it is the upload throughput), by product.",
    ["product"],
)
UPLOAD_OBJECTS = Counter(
    "tilepipe_upload_objects_total",
    "Objects the uploader handled, by outcome (uploaded, skipped, deleted).",
    ["outcome"],
)
UPLOAD_ARTIFACTS = Counter(
    "tilepipe_upload_artifacts_total",
    "Artifacts the uploader handled, by product and outcome (uploaded, skipped, failed).",
    ["product", "outcome"],
)
UPLOAD_FAILURES = Counter(
    "tilepipe_upload_failures_total",
    "Failed object-storage operations (each retry counts), by reason (auth, not_found, "
    "verify, transient, config).",
    ["reason"],
)
RAW_ARCHIVE_BYTES = Counter(
    "tilepipe_raw_archive_bytes_total",
    "Bytes of raw tiles read for archival (file=raw) and of the archives written (file=archive).",
    ["file"],
)
RAW_DELETED = Counter(
    "tilepipe_raw_deleted_total",
    "Raw tiles deleted after a verified upload of their archive, by outcome (deleted, failed).",
    ["outcome"],
)
UPLOAD_SECONDS = Histogram(
    "tilepipe_upload_duration_seconds",
    "Time to hash, upload and verify one artifact.",
    ["product"],
    buckets=DURATION_BUCKETS,
)


# ---------------------------------------------------------------- monitoring (issue 9)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
END_TO_END_SECONDS = Histogram(
    "tilepipe_end_to_end_latency_seconds",
    "From the last input tile of an output being complete on disk (tile_arrived completed_at) "
    "to the output event a stage published (its emitted_at), by stage and event kind.",
    ["stage", "event"],
    buckets=LATENCY_BUCKETS,
)
ACQ_TILES_DONE = Gauge(
    "tilepipe_acquisition_tiles_done",
    "Distinct tiles of an acquisition a stage has published its output for (stitch: tiles in "
    "stitched mosaics); from the event log, refreshed by the stage.",
    ["acq", "stage"],
)
ACQ_FINISHED = Gauge(
    "tilepipe_acquisition_finished",
    "1 once an acquisition is finished (lattice complete or declared), 0 while acquiring.",
    ["acq"],
)
DATA_ROOT_FREE = Gauge(
    "tilepipe_data_root_free_bytes",
    "Bytes available to unprivileged users on the filesystem of a data root (raw, work, output).",
    ["root", "path"],
)
DATA_ROOT_SIZE = Gauge(
    "tilepipe_data_root_size_bytes",
    "Size of the filesystem holding a data root (raw, work, output).",
    ["root", "path"],
)


def serve_metrics(host: str, port: int) -> int:
    """Expose /metrics on host:port (0 picks a free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


NOTIFY_MESSAGES = Counter(
    "tilepipe_notify_messages_total",
    "Webhook notifications, by kind (acq_started, slice_done, failures) and outcome "
    "(sent, dropped: given up after its retries).",
    ["kind", "outcome"],
)
NOTIFY_SKIPPED = Counter(
    "tilepipe_notify_events_skipped_total",
    "Events not notified, by reason (old: emitted before max_age_s; own_failure).",
    ["reason"],
)
