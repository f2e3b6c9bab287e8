//! A cluster of real `basalt-controller` processes on 127.0.0.1 for tests and
//! benchmarks: free ports, one data dir each, logs to files, stopped by PID
//! (SIGTERM or SIGKILL) and restarted on the same data dir.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use basalt_proto::v1::GetClusterStatusRequest;
use tonic::transport::{Channel, Endpoint};

/// The host build of a workspace binary, next to the running test's `deps/`.
pub fn host_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("BASALT_BIN_{}", name.replace('-', "_").to_uppercase())) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-hash -> target/debug/NAME (benches: target/release/deps/...)
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join(name);
    let debug = dir.parent().map(|t| t.join("debug").join(name));
    match debug {
        Some(d) if !here.exists() && d.exists() => {
            eprintln!("note: {} is missing, using the debug build {}", here.display(), d.display());
            d
        }
        _ => here,
    }
}

/// A port nobody listens on right now, for a daemon to bind soon after.
///
/// Taken outside Linux's ephemeral range (32768-60999): a port from
/// `bind(:0)` is also what outgoing connections pick as source ports, and one
/// was seen taken again before the controller bound it ("Address already in
/// use", no leader). Random per process, never handed out twice in one.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mut x = (u64::from(std::process::id()) * 2_654_435_761 + u64::from(nanos)) | 1;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        // xorshift: cheap, and different in every test process.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in 20000-31999 on 127.0.0.1")
}

#[derive(Default)]
pub struct Options {
    /// Extra TOML for every controller's config file (e.g. `[raft]` tuning).
    pub config: String,
    /// Address the controllers listen on and advertise (default 127.0.0.1),
    /// e.g. the bridge address of a network namespace the test entered.
    pub host: Option<String>,
}

struct Member {
    port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

pub struct ControllerCluster {
    dir: PathBuf,
    bin: PathBuf,
    opts: Options,
    members: BTreeMap<u64, Member>,
    /// Ids that formed the cluster at first start (its bootstrap peers).
    founders: Vec<u64>,
    _tmp: Option<TempDir>,
}

/// A directory removed on drop, without a tempfile dependency in the library.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ControllerCluster {
    /// Start `n` controllers (ids 1..=n); controller 1 bootstraps the cluster.
    pub fn start(n: u64, opts: Options) -> ControllerCluster {
        let bin = host_bin("basalt-controller");
        assert!(
            bin.exists(),
            "{} is missing: build it first (cargo build -p basalt-controller; deploy/test does)",
            bin.display()
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "basalt-ctl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut c = ControllerCluster {
            dir: dir.clone(),
            bin,
            opts,
            members: BTreeMap::new(),
            founders: (1..=n).collect(),
            _tmp: Some(TempDir(dir)),
        };
        for id in 1..=n {
            c.members.insert(id, Member { port: free_port(), metrics_port: free_port(), child: None });
        }
        for id in 1..=n {
            c.spawn(id);
        }
        c
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.members.iter().filter(|(_, m)| m.child.is_some()).map(|(id, _)| *id).collect()
    }

    fn host(&self) -> &str {
        self.opts.host.as_deref().unwrap_or("127.0.0.1")
    }

    pub fn addr(&self, id: u64) -> String {
        format!("{}:{}", self.host(), self.members[&id].port)
    }

    pub fn metrics_addr(&self, id: u64) -> String {
        format!("{}:{}", self.host(), self.members[&id].metrics_port)
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.members.get(&id).and_then(|m| m.child.as_ref()).map(Child::id)
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("controller-{id}.log"))
    }

    /// The last lines of every controller's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.members.keys() {
            let text = std::fs::read_to_string(self.log_path(*id)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- controller {id} (last 30 lines)\n"));
            for l in &lines[lines.len().saturating_sub(30)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn spawn(&mut self, id: u64) {
        let port = self.members[&id].port;
        let metrics_port = self.members[&id].metrics_port;
        let cfg_path = self.dir.join(format!("controller-{id}.toml"));
        let host = self.host().to_string();
        let mut cfg = format!(
            "node_id = {id}\nlisten = \"{host}:{port}\"\ndata_dir = \"{}\"\nmetrics_listen = \"{host}:{metrics_port}\"\n",
            self.dir.join(format!("data-{id}")).display()
        );
        if self.founders.contains(&id) {
            cfg.push_str(&format!("bootstrap = {}\n", id == self.founders[0]));
        }
        cfg.push_str(&self.opts.config);
        if self.founders.contains(&id) {
            cfg.push_str("\n[peers]\n");
            for p in self.founders.iter().filter(|p| **p != id) {
                cfg.push_str(&format!("{p} = \"{host}:{}\"\n", self.members[p].port));
            }
        }
        std::fs::write(&cfg_path, cfg).expect("write controller config");
        let log = File::options().create(true).append(true).open(self.log_path(id)).expect("controller log");
        // Reaped by kill()/stop(), or by Drop, which kills every member.
        let mut cmd = Command::new(&self.bin);
        // SAFETY: only prctl(2), async-signal-safe, runs between fork and
        // exec. A controller dies with the thread that started it, so a test
        // killed by a timeout (no Drop) leaves no controller behind.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        #[allow(clippy::zombie_processes)]
        let child = cmd
            .arg("--config")
            .arg(&cfg_path)
            .env(
                "BASALT_LOG",
                std::env::var("BASALT_TEST_CONTROLLER_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        if let Some(m) = self.members.get_mut(&id) {
            m.child = Some(child);
        }
    }

    /// Add a controller that is not a founder: it starts empty and waits to be added.
    pub fn start_new(&mut self, id: u64) {
        assert!(!self.members.contains_key(&id), "controller {id} exists");
        self.members.insert(id, Member { port: free_port(), metrics_port: free_port(), child: None });
        self.spawn(id);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.members.get_mut(&id).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (SIGKILL after 10 s).
    pub fn stop(&mut self, id: u64) {
        if let Some(mut child) = self.members.get_mut(&id).and_then(|m| m.child.take()) {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Start a stopped controller again on its data dir.
    pub fn restart(&mut self, id: u64) {
        assert!(self.members[&id].child.is_none(), "controller {id} is running");
        self.spawn(id);
    }

    /// Has the process exited on its own (crashed)?
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.members.get_mut(&id).and_then(|m| m.child.as_mut()).and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn channel(&self, id: u64) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr(id)))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(15))
            .connect_lazy()
    }

    pub fn client(&self, id: u64) -> ClusterServiceClient<Channel> {
        ClusterServiceClient::new(self.channel(id))
    }

    /// Wait until every running controller names the same leader; returns it.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.running() {
                let r = self.client(id).get_cluster_status(GetClusterStatusRequest { allow_stale: true }).await;
                seen.push(r.map(|s| s.into_inner().leader_id).unwrap_or(0));
            }
            if let Some(&l) = seen.first() {
                if l != 0 && seen.iter().all(|x| *x == l) && self.running().contains(&l) {
                    return l;
                }
            }
            if Instant::now() > deadline {
                panic!("no agreed leader within {timeout:?} (saw {seen:?})\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET /metrics of controller `id`.
    pub fn scrape_metrics(&self, id: u64) -> std::io::Result<String> {
        scrape_metrics(&self.metrics_addr(id))
    }
}

/// `GET /metrics` from any of Basalt's daemons (controller, agent): the raw HTTP answer.
pub fn scrape_metrics(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Drop for ControllerCluster {
    fn drop(&mut self) {
        for id in self.ids() {
            self.kill(id);
        }
    }
}
