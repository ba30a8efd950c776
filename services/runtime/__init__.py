"""What runs a stage: the stage author's contract (`stage`: Stage, Context, Result;
`options`: StageOptions, the base of every stage's options model, and their one parser), the
runner that consumes, acks, retries and parks (`runner`), the pull feed (`pullfeed`), the
NATS connection and the one publish path (`bus`), stream/consumer/bucket provisioning
(`provision`) and the hot-path latency and progress monitor (`monitor`). Builds on `core`,
`io` and `state`.
"""
