//! The I/O benchmark engine (being written).
