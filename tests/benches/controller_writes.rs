//! Not a test. Committed VM writes per second and p50/p99 latency with 1 and
//! 64 concurrent clients against three `basalt-controller`s on loopback, and
//! the same workload against a three-member etcd (Debian's etcd-server) in the
//! same run, alternating, as ratios. Then the time from SIGKILL of the leader
//! to the first accepted write, for both.
//!
//! `cargo build --release -p basalt-controller && cargo bench -p basalt-tests --bench controller_writes`
//! Environment: BENCH_SECONDS (per measurement, default 8), BENCH_REPEAT
//! (alternating rounds, default 2), BENCH_KILLS (default 3),
//! BASALT_BIN_BASALT_CONTROLLER (binary; default: next to this bench).
//!
//! Both systems fsync their log on every commit and run three members on the
//! same disk and the same two cores; writes go to the leader (the followers'
//! forwarding is measured by the tests, not here).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_tests::controllers::{free_port, ControllerCluster, Options};
use basalt_tests::etcd;
use hdrhistogram::Histogram;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn spec() -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1,
        memory_mib: 128,
        boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: "/var/lib/basalt/images/debian/Image".into(),
            initrd: "/var/lib/basalt/images/debian/initrd.img".into(),
            cmdline: "console=ttyS0 root=/dev/vda rw".into(),
        })),
        labels: [("app".to_string(), "bench".to_string())].into(),
        ..Default::default()
    }
}

/// The etcd value: the same spec, as the JSON an etcd-based system would store.
fn spec_json(name: &str) -> Vec<u8> {
    format!(
        r#"{{"name":"{name}","vcpus":1,"memory_mib":128,"boot":{{"kernel":"/var/lib/basalt/images/debian/Image","initrd":"/var/lib/basalt/images/debian/initrd.img","cmdline":"console=ttyS0 root=/dev/vda rw"}},"labels":{{"app":"bench"}},"desired_power":"Stopped","generation":1}}"#
    )
    .into_bytes()
}

#[derive(Clone, Copy, Debug)]
struct Result_ {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

trait Target: Send + Sync + 'static {
    fn write(&self, name: String) -> impl std::future::Future<Output = bool> + Send;
}

struct Basalt(basalt_proto::v1::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>);
impl Target for Basalt {
    async fn write(&self, name: String) -> bool {
        let req = pb::CreateVmRequest { name, spec: Some(spec()), desired_power: pb::Power::Stopped as i32 };
        self.0.clone().create_vm(req).await.is_ok()
    }
}

type EtcdKv = etcd::kv_client::KvClient<tonic::transport::Channel>;

fn etcd_put(key: String, value: Vec<u8>) -> etcd::PutRequest {
    etcd::PutRequest { key: key.into_bytes(), value, ..Default::default() }
}

struct Etcd(EtcdKv);
impl Target for Etcd {
    async fn write(&self, name: String) -> bool {
        let value = spec_json(&name);
        self.0.clone().put(etcd_put(format!("/vms/{name}"), value)).await.is_ok()
    }
}

fn etcd_channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy()
}

async fn etcd_status(endpoint: &str) -> Option<etcd::StatusResponse> {
    let mut m = etcd::maintenance_client::MaintenanceClient::new(etcd_channel(endpoint));
    let mut req = tonic::Request::new(etcd::StatusRequest {});
    req.set_timeout(Duration::from_secs(1));
    m.status(req).await.ok().map(|r| r.into_inner())
}

async fn load<T: Target>(target: Arc<T>, clients: usize, seconds: u64, tag: &str) -> Result_ {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut i = 0u64;
            let mut failed = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if target.write(format!("{tag}-{c}-{i}")).await {
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    failed += 1;
                }
                i += 1;
            }
            (h, failed)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut failed = 0;
    for t in tasks {
        let (h, f) = t.await.expect("client task");
        all.add(&h).expect("merge");
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if failed > 0 {
        eprintln!("  ({tag}: {failed} writes failed)");
    }
    Result_ {
        writes_per_s: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

struct EtcdCluster {
    dir: PathBuf,
    client_ports: Vec<u16>,
    procs: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
}

impl EtcdCluster {
    fn start(dir: PathBuf) -> EtcdCluster {
        let bin = which("etcd").expect("etcd not found: deploy/install-deps installs etcd-server");
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial: Vec<String> = (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", peer_ports[i])).collect();
        let mut c =
            EtcdCluster { dir: dir.clone(), client_ports: client_ports.clone(), procs: Vec::new(), args: Vec::new() };
        for i in 0..3 {
            let args = vec![
                format!("--name=e{i}"),
                format!("--data-dir={}", dir.join(format!("e{i}")).display()),
                format!("--listen-client-urls=http://127.0.0.1:{}", client_ports[i]),
                format!("--advertise-client-urls=http://127.0.0.1:{}", client_ports[i]),
                format!("--listen-peer-urls=http://127.0.0.1:{}", peer_ports[i]),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", peer_ports[i]),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=basalt-bench".into(),
                "--log-level=error".into(),
            ];
            c.args.push(args);
            c.procs.push(None);
            c.spawn(i, &bin);
        }
        c
    }

    fn spawn(&mut self, i: usize, bin: &PathBuf) {
        let log = std::fs::File::create(self.dir.join(format!("e{i}.log"))).expect("etcd log");
        let child = Command::new(bin)
            .args(&self.args[i])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.procs[i] = Some(child);
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.client_ports[i])
    }

    /// Index of the member that leads, as a live member reports it.
    async fn leader(&self) -> Option<usize> {
        for i in 0..3 {
            if self.procs[i].is_none() {
                continue;
            }
            let Some(st) = etcd_status(&self.endpoint(i)).await else { continue };
            if st.leader == 0 {
                continue;
            }
            for j in 0..3 {
                if self.procs[j].is_none() {
                    continue;
                }
                if let Some(sj) = etcd_status(&self.endpoint(j)).await {
                    if sj.header.map(|h| h.member_id) == Some(st.leader) {
                        return Some(j);
                    }
                }
            }
        }
        None
    }

    async fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            assert!(Instant::now() < deadline, "etcd elected no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.exists())
}

/// SIGKILL the leader, then write (to every live member in turn) until one
/// write is accepted: the time a client sees the cluster unwritable.
async fn basalt_failover(c: &mut ControllerCluster) -> Duration {
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let survivors: Vec<u64> = c.running().into_iter().filter(|id| *id != leader).collect();
    let clients: Vec<_> = survivors.iter().map(|id| c.client(*id)).collect();
    let t = Instant::now();
    c.kill(leader);
    let mut i = 0;
    loop {
        let mut cl = clients[i % clients.len()].clone();
        let req = pb::CreateVmRequest {
            name: format!("failover-{}-{i}", t.elapsed().as_nanos()),
            spec: Some(spec()),
            desired_power: pb::Power::Stopped as i32,
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_millis(500));
        if cl.create_vm(r).await.is_ok() {
            let d = t.elapsed();
            c.restart(leader);
            c.wait_leader(Duration::from_secs(30)).await;
            return d;
        }
        i += 1;
    }
}

async fn etcd_failover(e: &mut EtcdCluster, bin: &PathBuf) -> Duration {
    let leader = e.wait_leader().await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let clients: Vec<EtcdKv> =
        survivors.iter().map(|s| etcd::kv_client::KvClient::new(etcd_channel(&e.endpoint(*s)))).collect();
    let t = Instant::now();
    e.kill(leader);
    let mut i = 0;
    loop {
        let mut cl = clients[i % clients.len()].clone();
        let put =
            tokio::time::timeout(Duration::from_millis(500), cl.put(etcd_put(format!("/failover/{i}"), b"x".to_vec())))
                .await;
        if matches!(put, Ok(Ok(_))) {
            let d = t.elapsed();
            e.spawn(leader, bin);
            e.wait_leader().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            return d;
        }
        i += 1;
    }
}

fn main() {
    let seconds = env_u64("BENCH_SECONDS", 8);
    let repeat = env_u64("BENCH_REPEAT", 2);
    let kills = env_u64("BENCH_KILLS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let tmp = std::env::temp_dir().join(format!("basalt-bench-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("tmp");
        let mut c = ControllerCluster::start(3, Options::default());
        let mut e = EtcdCluster::start(tmp.clone());
        let bl = c.wait_leader(Duration::from_secs(30)).await;
        let el = e.wait_leader().await;
        let basalt = Arc::new(Basalt(c.client(bl)));
        let etcd = Arc::new(Etcd(etcd::kv_client::KvClient::new(etcd_channel(&e.endpoint(el)))));
        println!("controller writes: {seconds} s per measurement, {repeat} alternating rounds, medians");
        println!("{:>8} {:>8} {:>12} {:>9} {:>9}", "system", "clients", "writes/s", "p50 ms", "p99 ms");
        let mut summary = Vec::new();
        for clients in [1usize, 64] {
            let (mut bs, mut es) = (Vec::new(), Vec::new());
            for round in 0..repeat {
                let b = load(basalt.clone(), clients, seconds, &format!("b{clients}r{round}")).await;
                println!("{:>8} {:>8} {:>12.0} {:>9.2} {:>9.2}", "basalt", clients, b.writes_per_s, b.p50_ms, b.p99_ms);
                let x = load(etcd.clone(), clients, seconds, &format!("e{clients}r{round}")).await;
                println!("{:>8} {:>8} {:>12.0} {:>9.2} {:>9.2}", "etcd", clients, x.writes_per_s, x.p50_ms, x.p99_ms);
                bs.push(b);
                es.push(x);
            }
            let med = |v: &[Result_], f: fn(&Result_) -> f64| {
                let mut x: Vec<f64> = v.iter().map(f).collect();
                x.sort_by(|a, b| a.total_cmp(b));
                if x.len() % 2 == 1 { x[x.len() / 2] } else { (x[x.len() / 2 - 1] + x[x.len() / 2]) / 2.0 }
            };
            let (bw, ew) = (med(&bs, |r| r.writes_per_s), med(&es, |r| r.writes_per_s));
            let (b50, e50) = (med(&bs, |r| r.p50_ms), med(&es, |r| r.p50_ms));
            let (b99, e99) = (med(&bs, |r| r.p99_ms), med(&es, |r| r.p99_ms));
            summary.push(format!(
                "{clients:>3} clients: basalt {bw:.0} writes/s (p50 {b50:.2} ms, p99 {b99:.2} ms), etcd {ew:.0} writes/s (p50 {e50:.2} ms, p99 {e99:.2} ms); throughput ratio basalt/etcd {:.2}, p99 ratio {:.2}",
                bw / ew,
                b99 / e99
            ));
        }
        let bin = which("etcd").expect("etcd");
        let (mut bf, mut ef) = (Vec::new(), Vec::new());
        for _ in 0..kills {
            bf.push(basalt_failover(&mut c).await);
            ef.push(etcd_failover(&mut e, &bin).await);
        }
        bf.sort();
        ef.sort();
        println!();
        for s in summary {
            println!("{s}");
        }
        println!(
            "leader SIGKILL -> first accepted write, median of {kills}: basalt {:.2} s, etcd {:.2} s (all basalt {:?}, etcd {:?})",
            bf[bf.len() / 2].as_secs_f64(),
            ef[ef.len() / 2].as_secs_f64(),
            bf.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>(),
            ef.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>()
        );
        drop(e);
        let _ = std::fs::remove_dir_all(&tmp);
    });
}
