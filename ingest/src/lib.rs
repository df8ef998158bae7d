//! motley-ingest (being built).
