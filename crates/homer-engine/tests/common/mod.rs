//! Helpers the engine's test files share.
#![allow(dead_code)]

mod device;
pub use device::share_device;
