//! The guest side of nested tests: an initramfs for a VM that Basalt's VMM
//! runs *inside* an emulated arm64 host. Same Debian kernel as the host,
//! busybox, the virtio modules, and an init script chosen by the test.

use std::path::{Path, PathBuf};

use super::cpio::Archive;
use super::{io, Artifacts, RigError};

/// Modules the guest loads, in dependency order.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];

/// Builds the guest's initramfs (uncompressed newc cpio). The script runs
/// as /init after proc, sys and dev are mounted and the modules loaded; it
/// should end with `poweroff -f`.
pub fn initramfs(arts: &Artifacts, script: &str) -> Result<Vec<u8>, RigError> {
    initramfs_with(arts, script, &[])
}

/// [`initramfs`] with more files: (path in the guest, bytes), made executable.
pub fn initramfs_with(arts: &Artifacts, script: &str, files: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, RigError> {
    let dir = arm64_dir(arts);
    let busybox = std::fs::read(dir.join("busybox")).map_err(io("read arm64 busybox"))?;
    let mut a = Archive::new();
    a.dir("bin").dir("proc").dir("sys").dir("dev").dir("tmp").dir("lib").dir("lib/modules");
    a.file("bin/busybox", 0o755, &busybox);
    for (path, data) in files {
        a.file(path, 0o755, data);
    }
    let mut load = String::new();
    for m in MODULES {
        let p = dir.join("modules/kernel").join(m);
        let name = Path::new(m).file_name().and_then(|n| n.to_str()).unwrap_or("m.ko");
        let data = std::fs::read(&p).map_err(io(format!("read {}", p.display())))?;
        a.file(&format!("lib/modules/{name}"), 0o644, &data);
        load.push_str(&format!("insmod /lib/modules/{name}\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n{load}{script}\n\
         echo BASALT-GUEST-END\npoweroff -f\n"
    );
    a.file("init", 0o755, init.as_bytes());
    Ok(a.finish())
}

/// The smallest guest: busybox and an /init that mounts /proc and runs
/// `script` at once (busybox applets by full name, `/bin/busybox sleep`),
/// then powers off. No modules, no applet links: for boot-time
/// measurement, where everything init does before its marker is guest work
/// that tells nothing about the VMM.
pub fn initramfs_bare(arts: &Artifacts, script: &str) -> Result<Vec<u8>, RigError> {
    let busybox = std::fs::read(arm64_dir(arts).join("busybox")).map_err(io("read arm64 busybox"))?;
    let mut a = Archive::new();
    a.dir("bin").dir("proc");
    a.file("bin/busybox", 0o755, &busybox);
    let init =
        format!("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n{script}\n/bin/busybox poweroff -f\n");
    a.file("init", 0o755, init.as_bytes());
    Ok(a.finish())
}

/// The guest kernel: the host's own Debian arm64 Image.
pub fn kernel(arts: &Artifacts) -> Result<Vec<u8>, RigError> {
    std::fs::read(&arts.kernel).map_err(io("read the arm64 kernel"))
}

/// A module of the arm64 kernel (path under `kernel/`, e.g.
/// `drivers/net/tun.ko`), for a host script to `insmod`: the host's base
/// initramfs loads only what booting needs.
pub fn module(arts: &Artifacts, path: &str) -> Result<Vec<u8>, RigError> {
    let p = arm64_dir(arts).join("modules/kernel").join(path);
    std::fs::read(&p).map_err(io(format!("read {}", p.display())))
}

/// What a host needs for VMs on taps and a Linux bridge, in load order:
/// (name, path under the kernel's modules).
pub const BRIDGE_MODULES: [(&str, &str); 4] = [
    ("llc", "net/llc/llc.ko"),
    ("stp", "net/802/stp.ko"),
    ("bridge", "net/bridge/bridge.ko"),
    ("tun", "drivers/net/tun.ko"),
];

/// `host` with each of `modules` at `/basalt/mod/NAME.ko`, for its script to insmod.
pub fn with_modules(
    mut host: super::Arm64Host,
    arts: &Artifacts,
    modules: &[(&str, &str)],
) -> Result<super::Arm64Host, RigError> {
    for (name, path) in modules {
        host = host.file(&format!("mod/{name}.ko"), module(arts, path)?, 0o644);
    }
    Ok(host)
}

fn arm64_dir(arts: &Artifacts) -> PathBuf {
    arts.kernel.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// An emulated arm64 host ready to run `basalt-vmm` on a nested guest:
/// the VMM in `/basalt/bin`, the guest kernel and an initramfs running
/// `guest_script` in `/basalt/guest/` (the host script runs in `/basalt`).
pub fn vmm_host(arts: &Artifacts, name: &str, guest_script: &str) -> Result<super::Arm64Host, RigError> {
    Ok(super::Arm64Host::new(name)
        .memory_mib(2048)
        .timeout(std::time::Duration::from_secs(900))
        .arm64_bin(arts, "basalt-vmm")?
        .file("guest/Image", kernel(arts)?, 0o644)
        .file("guest/initrd", initramfs(arts, guest_script)?, 0o644))
}
