"""What runs a stage: the stage author's contract (`stage`: Stage, Context, Result; no NATS in
it; `options`: StageOptions, the base of every stage's options model, and their one parser),
the runner that consumes, acks, retries and parks, one `Delivery` at a time with one method
per outcome (`runner`), what the runtime and stages need from the server (`transport`: the
`Transport` protocol and its nats-py implementation) and its in-memory double with a test
Context (`testing`), the pull feed (`pullfeed`), the NATS connection and the one publish path
(`bus`), stream/consumer/bucket provisioning (`provision`) and the hot-path latency and
progress monitor (`monitor`). Builds on `core`, `io` and `state`.
"""
