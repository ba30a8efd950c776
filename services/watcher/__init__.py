"""The watcher service: raw files landing under the raw root become `tile_arrived` events
(`service`). Builds on `runtime` and below.
"""
