"""Queue consumers: rq workers that normalise, dedupe and write batches to sinks."""
