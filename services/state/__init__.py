"""What the pipeline knows, read from the event log and its key-value buckets: subject
scans of the stream (`eventlog`), per-tile status and its rendering (`status`,
`status_view`, `timeline`), acquisitions and their checks (`acquisitions`), the key-value
protocol the books use (`buckets`) and the stitch's and register's lattice and hold
bookkeeping (`lattice`). Subjects are parsed only by `messages.subjects`. Builds on `core`
and `io`.
"""
