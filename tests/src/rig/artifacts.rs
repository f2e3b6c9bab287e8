use std::path::{Path, PathBuf};

use super::RigError;

/// Where the rig's inputs are. Defaults match `deploy/lib/common.sh`;
/// `BASALT_ARM64_DIR` and `BASALT_CROSS_TARGET_DIR` override them.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub base_initramfs: PathBuf,
    /// Static arm64 binaries.
    pub arm64_bin_dir: PathBuf,
    /// Dynamically linked arm64 binaries (they need [`Artifacts::libs_disk`]).
    pub arm64_dynamic_bin_dir: PathBuf,
    /// ext4 image with the arm64 shared libraries (librbd, librados, glibc).
    pub libs_disk: PathBuf,
    pub qemu: PathBuf,
}

impl Artifacts {
    /// Finds every input or says which command makes the missing one.
    pub fn locate() -> Result<Self, RigError> {
        let cache = std::env::var_os("BASALT_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/basalt".into());
        let arm64 = std::env::var_os("BASALT_ARM64_DIR").map(PathBuf::from).unwrap_or_else(|| cache.join("arm64-host"));
        let cross = std::env::var_os("BASALT_CROSS_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("target-aarch64"));
        let a = Artifacts {
            kernel: arm64.join("Image"),
            base_initramfs: arm64.join("initramfs.cpio.gz"),
            arm64_bin_dir: cross.join("aarch64-unknown-linux-gnu/release"),
            arm64_dynamic_bin_dir: cross.join("dynamic/aarch64-unknown-linux-gnu/release"),
            libs_disk: arm64.join("libs.img"),
            qemu: std::env::var_os("BASALT_QEMU").map(PathBuf::from).unwrap_or_else(|| "qemu-system-aarch64".into()),
        };
        need(&a.kernel, "deploy/arm64-host/fetch")?;
        need(&a.base_initramfs, "deploy/arm64-host/build-initramfs")?;
        Ok(a)
    }

    /// An arm64 binary built by `deploy/cross/build`.
    pub fn arm64_bin(&self, name: &str) -> Result<PathBuf, RigError> {
        let p = self.arm64_bin_dir.join(name);
        need(&p, "deploy/cross/build")?;
        Ok(p)
    }

    /// A dynamically linked arm64 binary from `deploy/cross/build`.
    pub fn arm64_dynamic_bin(&self, name: &str) -> Result<PathBuf, RigError> {
        let p = self.arm64_dynamic_bin_dir.join(name);
        need(&p, "deploy/cross/build")?;
        Ok(p)
    }

    /// The shared-library disk, checked to exist.
    pub fn libs_disk(&self) -> Result<&Path, RigError> {
        need(&self.libs_disk, "deploy/arm64-host/build-libdisk")?;
        Ok(&self.libs_disk)
    }
}

fn need(p: &Path, maker: &str) -> Result<(), RigError> {
    if p.is_file() {
        Ok(())
    } else {
        Err(RigError::Missing(format!("{} is missing: run {maker} (deploy/install-deps and .ci/run do)", p.display())))
    }
}
