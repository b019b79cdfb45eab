//! Named streams over the log (see the store module doc).
