//! Everything the agent knows about `basalt-vmm`: the VM config it writes for
//! an assignment, and what the process's exit status means.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use basalt_proto::v1 as pb;
use basalt_vmm::config::{ConsoleConfig, DiskBackend, DiskConfig, NicConfig, RbdClient, VmConfig};
use basalt_vmm::devices::dhcp::{self, Lease};

use crate::config::CephConfig;

/// Files of one VM under the agent's state dir.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    pub fn new(state_dir: &Path, vm: &str) -> Self {
        VmDir(state_dir.join("vms").join(vm))
    }
    pub fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }
    pub fn console(&self) -> PathBuf {
        self.0.join("console.log")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
    /// The VMM's own stdout/stderr.
    pub fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("vmm.pid")
    }
}

/// The kernel's `ip=` for the first NIC (`ip=CLIENT::GATEWAY:NETMASK::eth0:off`),
/// which the kernel and initramfs-tools alike configure the guest from,
/// unless the VM's own command line already says how.
fn with_ip_argument(cmdline: &str, nic: Option<&pb::NicAddress>) -> String {
    let Some(n) = nic.filter(|_| !cmdline.split_whitespace().any(|w| w.starts_with("ip="))) else {
        return cmdline.to_string();
    };
    let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - n.prefix.min(32)).unwrap_or(0));
    format!("{cmdline} ip={}::{}:{mask}::eth0:off", n.ip, n.gateway).trim_start().to_string()
}

/// What the VMM answers the NIC's DHCP with: the IPAM's address, the
/// network's prefix and gateway, and the VM's name as hostname where it is
/// a DNS label. `None` when the controllers sent no usable address.
fn lease(vm: &str, n: &pb::NicAddress) -> Option<Lease> {
    let lease = Lease {
        address: n.ip.parse().ok()?,
        prefix: u8::try_from(n.prefix).ok()?,
        gateway: n.gateway.parse().ok(),
        hostname: dhcp::valid_hostname(vm).then(|| vm.to_string()),
    };
    match lease.validate() {
        Ok(()) => Some(lease),
        Err(e) => {
            tracing::warn!("VM {vm}: no DHCP for NIC {}: {e}", n.mac);
            None
        }
    }
}

/// The VMM config for an assigned VM. Errors say what in the spec cannot be run here.
pub fn vm_config(
    vm: &pb::Vm,
    volumes: &HashMap<String, pb::Volume>,
    ceph: &CephConfig,
    dir: &VmDir,
) -> Result<VmConfig, String> {
    let spec = vm.spec.as_ref().ok_or("the VM has no spec")?;
    let kernel = match &spec.boot {
        Some(pb::vm_spec::Boot::Kernel(k)) => k,
        Some(pb::vm_spec::Boot::BootVolume(v)) => {
            return Err(format!(
                "boot from volume {v} needs firmware, which basalt-vmm does not have: give the VM a kernel"
            ))
        }
        None => return Err("the VM spec names no kernel to boot".into()),
    };
    let mut disks = Vec::with_capacity(spec.disks.len());
    for d in &spec.disks {
        let v =
            volumes.get(&d.volume).ok_or_else(|| format!("volume {} was not sent with the assignment", d.volume))?;
        disks.push(DiskConfig {
            backend: DiskBackend::Rbd {
                pool: v.pool.clone(),
                image: v.image.clone(),
                client: RbdClient { conf: ceph.conf.clone(), id: ceph.id.clone(), keyring: ceph.keyring.clone() },
            },
            read_only: d.read_only,
            // GET_ID gives the guest at most 20 bytes: the volume name, cut.
            serial: Some(d.volume.chars().take(20).collect()),
        });
    }
    let cfg = VmConfig {
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel: kernel.kernel.clone().into(),
        initrd: (!kernel.initrd.is_empty()).then(|| kernel.initrd.clone().into()),
        cmdline: with_ip_argument(&kernel.cmdline, vm.nics.first()),
        disks,
        nics: vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| NicConfig {
                tap: crate::network::tap_name(&vm.name, i),
                mac: n.mac.clone(),
                mtu: Some(crate::network::OVERLAY_MTU),
                dhcp: lease(&vm.name, n),
            })
            .collect(),
        console: ConsoleConfig::File { path: dir.console() },
        its: false,
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Why a VMM process ended, from its exit status (see basalt-vmm's docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// Status 0: the guest powered off, or the VMM was stopped on request.
    Clean,
    /// Status 1: bad config or setup failure (a disk it could not open or
    /// lock, no KVM); nothing ran.
    Setup,
    /// Status 2: the guest or KVM failed.
    Crashed,
    /// Status 3: the guest kept resetting.
    ResetLoop,
    /// Status 4: the guest was live-migrated to another host, which runs it.
    MigratedAway,
    /// Killed by a signal, or a status the VMM does not use.
    Other(String),
}

impl ExitKind {
    pub fn of(status: ExitStatus) -> ExitKind {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => ExitKind::Clean,
            (Some(1), _) => ExitKind::Setup,
            (Some(2), _) => ExitKind::Crashed,
            (Some(3), _) => ExitKind::ResetLoop,
            (Some(4), _) => ExitKind::MigratedAway,
            (Some(c), _) => ExitKind::Other(format!("exit status {c}")),
            (None, Some(s)) => ExitKind::Other(format!("killed by signal {s}")),
            (None, None) => ExitKind::Other("ended without a status".into()),
        }
    }

    /// The label used in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ExitKind::Clean => "clean",
            ExitKind::Setup => "setup",
            ExitKind::Crashed => "crashed",
            ExitKind::ResetLoop => "reset_loop",
            ExitKind::MigratedAway => "migrated",
            ExitKind::Other(_) => "other",
        }
    }

    /// "exited ..." in words, for messages.
    pub fn describe(&self) -> String {
        match self {
            ExitKind::Clean => "exited (status 0)".into(),
            ExitKind::Setup => "could not set the VM up (status 1)".into(),
            ExitKind::Crashed => "failed (status 2)".into(),
            ExitKind::ResetLoop => "kept resetting (status 3)".into(),
            ExitKind::MigratedAway => "handed the guest over (status 4)".into(),
            ExitKind::Other(s) => s.clone(),
        }
    }
}

/// The last meaningful line the VMM wrote to its log: its own error message.
pub fn last_log_line(dir: &VmDir) -> String {
    let text = std::fs::read(dir.log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").chars().take(400).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(kernel: &Path) -> pb::Vm {
        pb::Vm {
            name: "web".into(),
            spec: Some(pb::VmSpec {
                vcpus: 2,
                memory_mib: 256,
                boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
                    kernel: kernel.display().to_string(),
                    initrd: String::new(),
                    cmdline: "console=ttyS0".into(),
                })),
                disks: vec![pb::Disk { volume: "web-root-volume-with-a-long-name".into(), read_only: false }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn blue_nic() -> pb::NicAddress {
        pb::NicAddress {
            network: "blue".into(),
            mac: "02:ba:5a:00:00:01".into(),
            ip: "10.10.0.2".into(),
            prefix: 24,
            gateway: "10.10.0.1".into(),
        }
    }

    #[test]
    fn the_first_nic_is_addressed_through_the_kernel_ip_argument() {
        let nic = blue_nic();
        assert_eq!(
            with_ip_argument("console=ttyS0", Some(&nic)),
            "console=ttyS0 ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off"
        );
        let no_gw = pb::NicAddress { gateway: String::new(), prefix: 29, ..nic.clone() };
        assert_eq!(with_ip_argument("", Some(&no_gw)), "ip=10.10.0.2:::255.255.255.248::eth0:off");
        assert_eq!(with_ip_argument("console=ttyS0 ip=dhcp", Some(&nic)), "console=ttyS0 ip=dhcp", "the VM's own wins");
        assert_eq!(with_ip_argument("console=ttyS0", None), "console=ttyS0");
    }

    #[test]
    fn each_nic_gets_its_ipam_address_as_a_dhcp_lease() {
        let nic = blue_nic();
        let l = lease("web-1", &nic).expect("lease");
        assert_eq!((l.address.to_string(), l.prefix, l.gateway.map(|g| g.to_string())), ("10.10.0.2".into(), 24, Some("10.10.0.1".into())));
        assert_eq!(l.hostname.as_deref(), Some("web-1"));
        // A name that is no DNS label is not offered; no gateway is none.
        let l = lease("web_1.x", &pb::NicAddress { gateway: String::new(), ..nic.clone() }).expect("lease");
        assert_eq!((l.hostname, l.gateway), (None, None));
        // Nothing usable from the controllers: no DHCP, rather than a wrong lease.
        assert_eq!(lease("web", &pb::NicAddress { ip: String::new(), ..nic.clone() }), None);
        assert_eq!(lease("web", &pb::NicAddress { prefix: 40, ..nic.clone() }), None);
        assert_eq!(lease("web", &pb::NicAddress { ip: "10.10.0.0".into(), ..nic }), None);
    }

    #[test]
    fn an_assignment_becomes_a_vmm_config_with_rbd_disks() {
        let dir = tempfile::tempdir().expect("tmp");
        let kernel = dir.path().join("Image");
        std::fs::write(&kernel, b"kernel").expect("kernel");
        let vol = pb::Volume {
            name: "web-root-volume-with-a-long-name".into(),
            pool: "rbd".into(),
            image: "web-root".into(),
            size_bytes: 1 << 30,
            profile: "fast".into(),
            ..Default::default()
        };
        let volumes = HashMap::from([(vol.name.clone(), vol)]);
        let ceph = CephConfig { conf: Some("/etc/ceph/ceph.conf".into()), id: Some("vm".into()), keyring: None };
        let d = VmDir::new(dir.path(), "web");
        let cfg = vm_config(&vm(&kernel), &volumes, &ceph, &d).expect("config");
        assert_eq!((cfg.vcpus, cfg.memory_mib, cfg.initrd.clone()), (2, 256, None));
        assert_eq!(cfg.console, ConsoleConfig::File { path: d.console() });
        let DiskBackend::Rbd { pool, image, client } = &cfg.disks[0].backend else { panic!("rbd") };
        assert_eq!((pool.as_str(), image.as_str(), client.id.as_deref()), ("rbd", "web-root", Some("vm")));
        assert_eq!(cfg.disks[0].serial.as_deref(), Some("web-root-volume-with"));

        // A missing volume, a missing kernel, boot from volume: refused with a reason.
        assert!(vm_config(&vm(&kernel), &HashMap::new(), &ceph, &d).unwrap_err().contains("not sent"));
        assert!(vm_config(&vm(&dir.path().join("nope")), &volumes, &ceph, &d).unwrap_err().contains("kernel"));
        let mut bv = vm(&kernel);
        bv.spec.as_mut().expect("spec").boot = Some(pb::vm_spec::Boot::BootVolume("x".into()));
        assert!(vm_config(&bv, &volumes, &ceph, &d).unwrap_err().contains("firmware"));
    }

    #[test]
    fn exit_statuses_are_classified() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(ExitKind::of(ExitStatus::from_raw(0)), ExitKind::Clean);
        assert_eq!(ExitKind::of(ExitStatus::from_raw(1 << 8)), ExitKind::Setup);
        assert_eq!(ExitKind::of(ExitStatus::from_raw(2 << 8)), ExitKind::Crashed);
        assert_eq!(ExitKind::of(ExitStatus::from_raw(3 << 8)), ExitKind::ResetLoop);
        assert_eq!(ExitKind::of(ExitStatus::from_raw(4 << 8)), ExitKind::MigratedAway);
        assert_eq!(ExitKind::of(ExitStatus::from_raw(9)), ExitKind::Other("killed by signal 9".into()));
    }
}
