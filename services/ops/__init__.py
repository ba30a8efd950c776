"""The operator's command line (`cli`, the `tilepipe` entry point) and what it drives:
pause/resume/replay/retry/history (`control`, `control_cli`), repairs (`repair`), status
(`status_cli`), `tilepipe check` (`preflight`), `process-tile`, `import-opticstream`,
`finish`. The top layer: nothing imports it.
"""
