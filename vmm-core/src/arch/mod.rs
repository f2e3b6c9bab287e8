//! Architecture support. arm64 is the only target Basalt runs guests on.
pub mod aarch64;
