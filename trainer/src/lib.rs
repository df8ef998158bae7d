//! motley-trainer (being built).
