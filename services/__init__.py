"""tilepipe's services, in layers that import only downward (tests/test_layers.py checks it):

    ops         operator CLI (`tilepipe`) and operator commands          (top)
    local       serve, supervisor, up, embedded nats-server, auth, demo, simulator
    monitoring  resource collectors, Prometheus config, dashboard checks
    watcher     files landing -> tile_arrived
    stages      convert, process, stitch, register, upload, notify, command; the registry
    runtime     Stage/Context/Result, runner, transport (+ test double), bus, provision, monitor
    state       event-log reading, status, acquisitions, lattice and hold bookkeeping
    io          raw formats, layout, the atomic writer, OME-Zarr/NIfTI/previews, storage
    core        config, manifest, calibration files, names, errors, logs, metrics  (bottom)

`messages` (events and subjects) and `kernels` (the numerics, NumPy or CuPy) sit below all of
them and import nothing from `services`. A module may import its own package and the packages
below it; imports sit at the top of a module except optional dependencies (CuPy, pynvml).
"""
