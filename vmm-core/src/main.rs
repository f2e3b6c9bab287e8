//! `basalt-vmm`: runs one arm64 VM in this process.
//!
//! Exit status: 0 the guest powered off (or was stopped on request);
//! 1 bad configuration or setup failure (nothing ran; also an incoming
//! migration that failed); 2 the guest or KVM failed; 3 the guest kept
//! resetting (more than 10 resets in a minute); 4 the VM moved to another
//! host (live migration handed it over).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use basalt_vmm::config::{ConsoleConfig, DiskBackend, DiskConfig, VmConfig};

#[derive(Parser, Debug)]
#[command(version, about = "Run one arm64 KVM virtual machine", args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    client: Option<Client>,
    /// Serve the control socket (versioned JSON, see vmm-core/README.md) here.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// VM configuration as JSON (see vmm-core/README.md); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// arm64 Linux Image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest RAM in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// A raw disk image file, `PATH` or `PATH,ro` (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// A virtio-net NIC on a host tap: `TAP,MAC[,mtu=N][,ip=ADDR/PREFIX[,gw=IP][,hostname=NAME]]`
    /// (e.g. `tap0,52:54:00:12:34:56,ip=10.0.0.5/24,gw=10.0.0.1`); repeat for
    /// more. The tap is created if it does not exist. With `ip`, the VMM
    /// answers the guest's DHCP with that address itself.
    #[arg(long)]
    nic: Vec<String>,
    /// Give the guest a GICv3 ITS (MSI translation).
    #[arg(long)]
    its: bool,
    /// Serial console: `stdout`, `pty`, `none` or `file:PATH`.
    #[arg(long)]
    console: Option<String>,
    /// Receive this VM by live migration instead of booting it: listen on
    /// HOST:PORT, or (without a value) wait for `migrate-receive` on the
    /// control socket. The config must describe the same VM as the sender's.
    #[arg(long, value_name = "HOST:PORT", num_args = 0..=1, default_missing_value = "")]
    incoming: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Client {
    /// Send one command to a running VMM's control socket and print the answer.
    Ctl {
        #[arg(long)]
        socket: PathBuf,
        /// status, pause, resume, shutdown, counters, vgic-state, save, restore,
        /// migrate-send, migrate-status, migrate-cancel, migrate-receive
        command: String,
        /// Arguments as JSON, e.g. '{"path":"/tmp/snap"}' for save and restore,
        /// '{"peer":"10.0.0.2:7000","downtime_ms":300,"bandwidth_mib_s":100,"timeout_s":600}'
        /// for migrate-send, '{"listen":"0.0.0.0:7000"}' for migrate-receive.
        #[arg(long)]
        args: Option<String>,
    },
}

fn ctl(socket: &std::path::Path, command: &str, args: Option<&str>) -> ExitCode {
    let args = match args.map(serde_json::from_str).transpose() {
        Ok(a) => a.unwrap_or(serde_json::Value::Null),
        Err(e) => {
            eprintln!("basalt-vmm ctl: --args is not JSON: {e}");
            return ExitCode::from(1);
        }
    };
    match basalt_vmm::control::call(socket, command, args, Duration::from_secs(60)) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("basalt-vmm ctl: {}: {e}", socket.display());
            ExitCode::from(1)
        }
    }
}

fn build_config(a: &Args) -> Result<VmConfig, String> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => VmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: a.kernel.clone().ok_or("give --config or --kernel")?,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![],
            nics: vec![],
            console: ConsoleConfig::Stdout,
            its: false,
        },
    };
    cfg.its |= a.its;
    if let Some(k) = &a.kernel {
        cfg.kernel = k.clone();
    }
    if a.initrd.is_some() {
        cfg.initrd = a.initrd.clone();
    }
    if let Some(c) = &a.cmdline {
        cfg.cmdline = c.clone();
    }
    if let Some(v) = a.vcpus {
        cfg.vcpus = v;
    }
    if let Some(m) = a.memory {
        cfg.memory_mib = m;
    }
    for d in &a.disk {
        let (path, ro) = match d.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (d.as_str(), false),
        };
        cfg.disks.push(DiskConfig { backend: DiskBackend::File { path: path.into() }, read_only: ro, serial: None });
    }
    for n in &a.nic {
        cfg.nics.push(basalt_vmm::config::NicConfig::from_flag(n)?);
    }
    if let Some(c) = &a.console {
        cfg.console = match c.as_str() {
            "stdout" => ConsoleConfig::Stdout,
            "none" => ConsoleConfig::None,
            "pty" => ConsoleConfig::Pty,
            f => match f.strip_prefix("file:") {
                Some(p) => ConsoleConfig::File { path: p.into() },
                None => return Err(format!("--console {c:?}: use stdout, pty, none or file:PATH")),
            },
        };
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

#[cfg(target_arch = "aarch64")]
fn run(cfg: &VmConfig, control: Option<&std::path::Path>, incoming: Option<&str>) -> ExitCode {
    use basalt_vmm::vm::{Vm, VmExit};
    use std::time::Instant;
    let started = Instant::now();
    let mut resets: Vec<Instant> = Vec::new();
    let mut snapshot: Option<std::path::PathBuf> = None;
    let mut incoming = incoming;
    loop {
        let built = match (snapshot.take(), incoming) {
            (None, Some(_)) => Vm::incoming(cfg),
            (None, None) => Vm::new(cfg),
            (Some(dir), _) => {
                eprintln!("basalt-vmm: restoring the VM from {}", dir.display());
                Vm::restore(cfg, &dir)
            }
        };
        let setup_ms = started.elapsed().as_millis();
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("basalt-vmm: cannot start the VM: {e}");
                return ExitCode::from(1);
            }
        };
        log::info!("VM ready to run {setup_ms} ms after the VMM started");
        let ran = match incoming.take() {
            Some(listen) => match vm.run_incoming(control, Some(listen).filter(|l| !l.is_empty())) {
                Err(e) => {
                    // Nothing ran here: the VM is still where it came from.
                    eprintln!("basalt-vmm: {e}");
                    return ExitCode::from(1);
                }
                ok => ok,
            },
            None => vm.run(control),
        };
        match ran {
            Ok(VmExit::Migrated(peer)) => {
                eprintln!("basalt-vmm: the VM moved to {peer}; this VMM is done");
                return ExitCode::from(4);
            }
            Ok(VmExit::PowerOff) => {
                eprintln!("basalt-vmm: the guest powered off");
                return ExitCode::SUCCESS;
            }
            Ok(VmExit::Stopped) => {
                eprintln!("basalt-vmm: stopped on request");
                return ExitCode::SUCCESS;
            }
            Ok(VmExit::Reset) => {
                let now = Instant::now();
                resets.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                resets.push(now);
                if resets.len() > 10 {
                    eprintln!("basalt-vmm: the guest reset {} times in a minute; giving up", resets.len());
                    return ExitCode::from(3);
                }
                eprintln!("basalt-vmm: the guest asked for a reset; restarting it");
            }
            Ok(VmExit::Restore(dir)) => snapshot = Some(dir),
            Ok(VmExit::Crashed(why)) => {
                eprintln!("basalt-vmm: the VM failed: {why}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("basalt-vmm: the VM failed: {e}");
                return ExitCode::from(2);
            }
        }
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn run(_cfg: &VmConfig, _control: Option<&std::path::Path>, _incoming: Option<&str>) -> ExitCode {
    eprintln!("basalt-vmm: runs arm64 guests on arm64 hosts only; this is {}", std::env::consts::ARCH);
    ExitCode::from(1)
}

/// Device models log guest misbehaviour through the `log` crate: to stderr,
/// warnings and up unless BASALT_VMM_LOG=debug|info|trace.
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("basalt-vmm: [{}] {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("BASALT_VMM_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(Box::leak(Box::new(StderrLog(level)))).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    if let Some(Client::Ctl { socket, command, args: a }) = &args.client {
        return ctl(socket, command, a.as_deref());
    }
    match build_config(&args) {
        Ok(cfg) => run(&cfg, args.control_socket.as_deref(), args.incoming.as_deref()),
        Err(e) => {
            eprintln!("basalt-vmm: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<VmConfig, String> {
        build_config(&Args::try_parse_from(args).map_err(|e| e.to_string())?)
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        let k = tempfile::NamedTempFile::new().expect("tmp");
        let kernel = k.path().to_str().expect("utf8");
        assert!(config(&["basalt-vmm", "--kernel", kernel]).is_ok());
        assert!(config(&["basalt-vmm"]).unwrap_err().contains("--kernel"));
        assert!(config(&["basalt-vmm", "--kernel", kernel, "--console", "serial0"]).unwrap_err().contains("pty"));
        assert!(config(&["basalt-vmm", "--kernel", kernel, "--memory", "1"]).unwrap_err().contains("memory_mib"));
        assert!(config(&["basalt-vmm", "--kernel", kernel, "--disk", "/nonexistent,ro"])
            .unwrap_err()
            .contains("disk 0"));
        assert!(config(&["basalt-vmm", "--config", "/nonexistent.json"]).unwrap_err().contains("cannot read"));
        let ok =
            config(&["basalt-vmm", "--kernel", kernel, "--console", "pty", "--its", "--vcpus", "2"]).expect("valid");
        assert_eq!((ok.console, ok.its, ok.vcpus), (ConsoleConfig::Pty, true, 2));
    }
}
