"""What both sides of Scheduler.Submit agree on for resubmission (scheduler.proto, Submit;
docs/architecture.md, "Scheduler restart"). The scheduler sends QUEUED_METADATA as the call's
initial metadata once a request is queued, and FINAL_METADATA as trailing metadata with every
error it ends a queued request with itself. The gateway resubmits a request whose stream breaks
after the first without the second: the scheduler went away, not the request's own error (an
UNAVAILABLE "no executor serves the model" is the request's own)."""

QUEUED_HEADER = "x-pagedserve-queued"
QUEUED_METADATA = ((QUEUED_HEADER, "1"),)
FINAL_HEADER = "x-pagedserve-final"
FINAL_METADATA = ((FINAL_HEADER, "1"),)
