use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpio::Archive;
use super::{io, Artifacts, RigError};

/// The line `/init` prints after the run's command; the harness's contract
/// with `deploy/arm64-host/init`.
const EXIT_MARKER: &str = "BASALT-RIG-EXIT rc=";

/// A virtio-net NIC on a tap device of a [`super::Netns`] bridge.
#[derive(Debug, Clone)]
pub struct Nic {
    pub netns: String,
    pub tap: String,
    pub mac: String,
    /// Address with prefix, configured on the guest's eth0 (`10.77.0.11/24`).
    pub ip_cidr: String,
}

/// One emulated arm64 host: qemu-system-aarch64 (TCG) with EL2 and a GICv3,
/// Debian's arm64 kernel, the base initramfs plus this run's files.
#[derive(Debug, Clone)]
pub struct Arm64Host {
    name: String,
    cpu: String,
    smp: u32,
    mem_mib: u32,
    timeout: Duration,
    cmdline: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
    script: String,
    disks: Vec<PathBuf>,
    read_only_disks: Vec<PathBuf>,
    nic: Option<Nic>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// Exit status of the run's command, if `/init` reported one.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Everything the host printed on its serial console.
    pub console: String,
    pub wall: Duration,
}

impl Outcome {
    /// Output of the run's command: the console between boot and the exit marker.
    pub fn command_output(&self) -> &str {
        let start = self.console.find("BASALT-RIG-BOOTED").unwrap_or(0);
        let end = self.console.find(EXIT_MARKER).unwrap_or(self.console.len());
        &self.console[start..end.max(start)]
    }

    /// Panics with the console's tail unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.exit_code == Some(0) && !self.timed_out,
            "host {} failed (exit {:?}, timed out {}); console tail:\n{}",
            self.name,
            self.exit_code,
            self.timed_out,
            tail(&self.console, 60)
        );
        self
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Arm64Host {
    pub fn new(name: &str) -> Self {
        Arm64Host {
            name: name.to_string(),
            // The cheapest CPU model with VHE (rig measurements).
            cpu: "neoverse-n1".into(),
            smp: 2,
            mem_mib: 1024,
            timeout: Duration::from_secs(240),
            cmdline: Vec::new(),
            files: Vec::new(),
            script: String::new(),
            disks: Vec::new(),
            read_only_disks: Vec::new(),
            nic: None,
        }
    }

    pub fn cpu(mut self, cpu: &str) -> Self {
        self.cpu = cpu.into();
        self
    }
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }
    pub fn memory_mib(mut self, m: u32) -> Self {
        self.mem_mib = m;
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Extra kernel command line argument (`kvm-arm.mode=none`, ...).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.cmdline.push(arg.into());
        self
    }
    /// A file placed in the host at `/basalt/<name>`.
    pub fn file(mut self, name: &str, data: Vec<u8>, mode: u32) -> Self {
        self.files.push((format!("basalt/{name}"), data, mode));
        self
    }
    /// An arm64 binary from `deploy/cross/build`, placed in `/basalt/bin` (on PATH).
    pub fn arm64_bin(mut self, arts: &Artifacts, name: &str) -> Result<Self, RigError> {
        let p = arts.arm64_bin(name)?;
        let data = std::fs::read(&p).map_err(io(format!("read {}", p.display())))?;
        self.files.push((format!("basalt/bin/{name}"), data, 0o755));
        Ok(self)
    }
    /// A dynamically linked arm64 binary, placed in `/basalt/bin`; it runs
    /// only with [`Arm64Host::libs`].
    pub fn arm64_dynamic_bin(mut self, arts: &Artifacts, name: &str) -> Result<Self, RigError> {
        let p = arts.arm64_dynamic_bin(name)?;
        let data = std::fs::read(&p).map_err(io(format!("read {}", p.display())))?;
        self.files.push((format!("basalt/bin/{name}"), data, 0o755));
        Ok(self)
    }
    /// Attaches the arm64 shared-library disk (read-only); `/init` mounts it.
    pub fn libs(mut self, arts: &Artifacts) -> Result<Self, RigError> {
        self.read_only_disks.push(arts.libs_disk()?.to_path_buf());
        Ok(self)
    }
    /// The shell script (busybox sh) the host runs; its exit status is the run's.
    pub fn script(mut self, s: &str) -> Self {
        self.script = s.into();
        self
    }
    /// A raw disk image attached as a virtio-blk device.
    pub fn disk(mut self, path: &Path) -> Self {
        self.disks.push(path.into());
        self
    }
    /// A raw disk image attached read-only as a virtio-blk device; the
    /// script mounts it (`/init` mounts only the libs disk).
    pub fn read_only_disk(mut self, path: &Path) -> Self {
        self.read_only_disks.push(path.into());
        self
    }
    pub fn nic(mut self, nic: Nic) -> Self {
        self.nic = Some(nic);
        self
    }

    pub fn run(self) -> Result<Outcome, RigError> {
        self.spawn()?.wait()
    }

    /// Starts the host; [`Running::wait`] collects the outcome. Several hosts
    /// may run at once.
    pub fn spawn(self) -> Result<Running, RigError> {
        let arts = Artifacts::locate()?;
        let work = tempfile_dir(&self.name)?;
        let initrd = work.join("initrd.img");
        let mut img = std::fs::read(&arts.base_initramfs).map_err(io("read base initramfs"))?;
        let mut payload = Archive::new();
        payload.dir("basalt").dir("basalt/bin");
        // The kernel does not create missing parent directories when it
        // unpacks an initramfs: give every file's directories an entry.
        let mut dirs: Vec<String> = Vec::new();
        for (path, ..) in &self.files {
            for a in std::path::Path::new(path).ancestors().skip(1) {
                let a = a.to_string_lossy().into_owned();
                if !a.is_empty() && a != "basalt" && a != "basalt/bin" && !dirs.contains(&a) {
                    dirs.push(a);
                }
            }
        }
        dirs.sort();
        for d in &dirs {
            payload.dir(d);
        }
        for (path, data, mode) in &self.files {
            payload.file(path, *mode, data);
        }
        payload.file("basalt/run.sh", 0o755, format!("#!/bin/sh\n{}\n", self.script).as_bytes());
        // The kernel unpacks concatenated archives, compressed or not, each
        // starting on a 4-byte boundary.
        while img.len() % 4 != 0 {
            img.push(0);
        }
        img.extend_from_slice(&payload.finish());
        std::fs::write(&initrd, &img).map_err(io("write initrd"))?;

        let mut append =
            vec!["console=ttyAMA0".to_string(), "panic=-1".into(), format!("basalt.hostname={}", self.name)];
        // Kernel messages only when asked: they interleave with the command's output.
        if std::env::var_os("BASALT_RIG_VERBOSE").is_none() {
            append.push("quiet".into());
        }
        if let Some(nic) = &self.nic {
            append.push(format!("basalt.ip={}", nic.ip_cidr));
        }
        append.extend(self.cmdline.iter().cloned());

        let mut cmd = match &self.nic {
            Some(nic) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &nic.netns]).arg(&arts.qemu);
                c
            }
            None => Command::new(&arts.qemu),
        };
        cmd.args(["-machine", "virt,virtualization=on,gic-version=3", "-cpu", &self.cpu])
            .args(["-smp", &self.smp.to_string(), "-m", &self.mem_mib.to_string()])
            .args(["-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&arts.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append.join(" ")]);
        let disks = self.disks.iter().map(|d| (d, "")).chain(self.read_only_disks.iter().map(|d| (d, ",read-only=on")));
        for (i, (d, ro)) in disks.enumerate() {
            cmd.arg("-drive").arg(format!("file={},format=raw,if=none,id=d{i},cache=writeback{ro}", d.display()));
            cmd.args(["-device", &format!("virtio-blk-device,drive=d{i}")]);
        }
        if let Some(nic) = &self.nic {
            cmd.args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", nic.tap)]);
            cmd.args(["-device", &format!("virtio-net-device,netdev=n0,mac={}", nic.mac)]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: only prctl(2), async-signal-safe, runs between fork and
        // exec: qemu dies with the thread that started it, so a test killed
        // by a timeout (no Drop) leaves no emulated host running.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(io(format!("start {}", arts.qemu.display())))?;
        let console = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            pump(child.stdout.take(), self.name.clone(), console.clone()),
            pump(child.stderr.take(), format!("{} qemu", self.name), console.clone()),
        ];
        Ok(Running { name: self.name, child, console, readers, started, timeout: self.timeout, work })
    }
}

/// A host that is running; dropping it kills its qemu.
pub struct Running {
    name: String,
    child: Child,
    console: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    timeout: Duration,
    work: PathBuf,
}

impl Running {
    /// The console so far (the host keeps running).
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; false after `timeout` or if
    /// the host ended first.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.console().contains(needle) {
                return true;
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                return self.console().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Powers the host off (kills its qemu) and collects the outcome: for
    /// hosts whose command runs until the test is done with them.
    pub fn stop(mut self) -> Result<Outcome, RigError> {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        self.wait()
    }

    pub fn wait(mut self) -> Result<Outcome, RigError> {
        let mut timed_out = false;
        loop {
            if self.child.try_wait().map_err(io("wait for qemu"))?.is_some() {
                break;
            }
            if self.started.elapsed() > self.timeout {
                timed_out = true;
                eprintln!("[{}] timeout after {:?}: killing qemu (pid {})", self.name, self.timeout, self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let console = self.console.lock().map(|c| c.clone()).unwrap_or_default();
        let exit_code = console
            .lines()
            .rev()
            .filter_map(|l| l.split_once(EXIT_MARKER))
            .find_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        Ok(Outcome { name: self.name.clone(), exit_code, timed_out, console, wall: self.started.elapsed() })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn pump(src: Option<impl Read + Send + 'static>, tag: String, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(src) = src else { return };
        for line in BufReader::new(src).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            eprintln!("[{tag}] {line}");
            if let Ok(mut s) = sink.lock() {
                s.push_str(line);
                s.push('\n');
            }
        }
    })
}

fn tempfile_dir(name: &str) -> Result<PathBuf, RigError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "basalt-rig-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
    Ok(d)
}
