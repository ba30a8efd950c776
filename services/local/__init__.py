"""Running everything on one machine: a stage or the watcher as a service process (`serve`),
the supervisor of those processes (`supervisor`), `tilepipe up` (`up`), the embedded NATS
server (`natsserver`) and its accounts (`natsauth`), the demo (`demo`) and the acquisition
simulator (`simulate`). Builds on `monitoring` and below.
"""
