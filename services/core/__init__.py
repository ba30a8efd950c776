"""Foundations every other package builds on: the host configuration (`config`), the
acquisition manifest and the instrument's calibration files (`manifest`, `calibration_files`),
the lab's naming templates (`names`), opening only regular files (`regular_files`), writing
TOML and reporting a file that does not read (`tomlio`), structured logs (`logs`), the
Prometheus metrics of every service (`metrics`) and the project's error classes (`errors`).
Imports nothing from `services` outside this package.
"""
