"""What the pipeline knows, read from the event log and its key-value buckets: subject
scans of the stream (`eventlog`), per-tile status and its rendering (`status`,
`status_view`, `timeline`), acquisitions and their checks (`acquisitions`) and the stitch's
lattice and hold bookkeeping (`lattice`). Subjects are parsed only by `messages.subjects`.
Builds on `core` and `io`.
"""
