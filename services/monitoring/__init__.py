"""Monitoring beside the services: resource gauges on every /metrics (`collectors`),
Prometheus scrape configurations (`prometheus`), Grafana dashboard checks (`dashboards`) and
their command line (`python -m services.monitoring`).

Metric reference (all exported on every service's /metrics):

- per stage (runtime): `tilepipe_events_handled_total{stage,outcome}`,
  `tilepipe_handle_duration_seconds`, `tilepipe_in_flight`, `tilepipe_read_bytes_total`,
  `tilepipe_written_bytes_total`, `tilepipe_consumer_{pending,ack_pending,redelivered}_messages`,
  `tilepipe_consumer_paused`, `tilepipe_stream_{used,max}_bytes{stream}` (the event stream,
  `KV_tp-holds`, and the KV buckets a stage keeps bookkeeping in);
- `tilepipe_end_to_end_latency_seconds{stage,event}` and
  `tilepipe_acquisition_tiles_done{acq,stage}`: `services.runtime.monitor.StageMonitor`;
- watcher: `tilepipe_watcher_latency_seconds`, `tilepipe_acquisition_tiles_{expected,arrived}`;
- resources: `process_*` (prometheus_client's process collector, on by default),
  `tilepipe_data_root_{free,size}_bytes{root,path}`, and `tilepipe_gpu_devices` plus, where a
  GPU is visible (NVML through `pynvml`, else an already imported CuPy),
  `tilepipe_gpu_info{gpu,name}`, `tilepipe_gpu_memory_{used,total}_bytes{gpu}`,
  `tilepipe_gpu_utilization_ratio{gpu}` (NVML only), `tilepipe_gpu_process_memory_bytes{gpu}`.

Prometheus scrapes each service as job `tilepipe-<service>` with a `host` target label;
dashboards (`grafana/dashboards/`) and alert rules (`grafana/alerts/`) rely on that.

    python -m services.monitoring prometheus-config --up-output up.log -o prometheus.yml
    python -m services.monitoring prometheus-config --config tp.toml --rules 'grafana/alerts/*.yml'
    python -m services.monitoring lint-dashboards grafana/dashboards/*.json

Builds on `stages` and below.
"""
