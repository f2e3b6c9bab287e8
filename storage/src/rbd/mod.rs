//! RBD through librbd: image management and the VM block backend.

mod backend;
pub mod image;

pub use backend::RbdBackend;
pub use image::{clone, create, features, list, remove, Image, ImageInfo, ImageOptions};
